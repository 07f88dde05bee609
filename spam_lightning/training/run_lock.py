"""One run per run folder: a second run there would overwrite the first's files silently."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from spam_lightning.io_utils import LockBusy, file_lock

LOCK_NAME = ".run.lock"
PID_NAME = ".run.pid"  # beside the lock: acquiring a FileLock truncates the lock file itself


class RunFolderBusy(RuntimeError):
    """Another process holds the run folder's lock."""


@contextlib.contextmanager
def run_folder_lock(folder: Path) -> Iterator[None]:
    """Hold ``folder``'s lock while a run uses it; refuse at once if another process holds it."""
    pid_file, held = folder / PID_NAME, contextlib.ExitStack()
    try:
        held.enter_context(file_lock(folder / LOCK_NAME, wait=False))
    except LockBusy:
        holder = "unknown"
        with contextlib.suppress(OSError):
            holder = pid_file.read_text(encoding="utf-8").strip() or holder
        raise RunFolderBusy(
            f"the run folder {folder} is in use by another run (PID {holder}); wait for it to "
            f"end, or give this run its own folder (drop hydra.run.dir=, or set another one)"
        ) from None
    with held:
        pid_file.write_text(f"{os.getpid()}\n", encoding="utf-8")
        try:
            yield
        finally:
            pid_file.unlink(missing_ok=True)
