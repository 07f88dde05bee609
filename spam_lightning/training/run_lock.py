"""One run per run folder: a second run there would overwrite the first's files silently."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout

LOCK_NAME = ".run.lock"
PID_NAME = ".run.pid"  # beside the lock: acquiring a FileLock truncates the lock file itself


class RunFolderBusy(RuntimeError):
    """Another process holds the run folder's lock."""


@contextlib.contextmanager
def run_folder_lock(folder: Path) -> Iterator[None]:
    """Hold ``folder``'s lock while a run uses it; refuse at once if another process holds it.
    The lock is the OS's (``flock``), so a killed run never leaves the folder locked."""
    lock = FileLock(str(folder / LOCK_NAME), timeout=0)
    pid_file = folder / PID_NAME
    try:
        lock.acquire()
    except Timeout:
        try:
            holder = pid_file.read_text(encoding="utf-8").strip() or "unknown"
        except OSError:
            holder = "unknown"
        raise RunFolderBusy(
            f"the run folder {folder} is in use by another run (PID {holder}); wait for it to "
            f"end, or give this run its own folder (drop hydra.run.dir=, or set another one)"
        ) from None
    try:
        pid_file.write_text(f"{os.getpid()}\n", encoding="utf-8")
        yield
    finally:
        pid_file.unlink(missing_ok=True)
        lock.release()


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the ``.NAME.*.tmp`` files an interrupted atomic write left (only while the run
    lock is held: no other process can be writing them)."""
    removed = []
    for tmp in folder.rglob(".*.tmp") if folder.is_dir() else ():
        with contextlib.suppress(OSError):
            tmp.unlink()
            removed.append(tmp)
    return removed
