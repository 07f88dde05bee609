"""The file infrastructure every writer shares: one atomic write, one sweep of the temporaries a
killed writer left, one lock helper (the OS's ``flock``: a killed holder never leaves it locked)."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from filelock import FileLock
from filelock import Timeout as LockBusy  # what ``file_lock(wait=False)`` raises


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on ``.NAME.RANDOM.tmp`` beside ``path``, fsync it, then rename it onto
    ``path`` (same folder: the rename is atomic); on any failure the temporary goes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file normal permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def write_json(path: str | Path, data: Any) -> Path:
    text = json.dumps(data, indent=2, default=str) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def target_of(tmp: Path) -> Path:
    """The file an ``atomic_write`` temporary was meant to become (``.NAME.RANDOM.tmp`` -> NAME)."""
    return tmp.with_name(tmp.name[1:].rsplit(".", 2)[0])


@contextlib.contextmanager
def file_lock(path: str | Path, wait: bool = True, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold the lock file ``path``. ``wait=False``: raise ``LockBusy`` at once if another process
    holds it; else ``on_wait()`` (e.g. a log line) is called once before waiting for it."""
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except LockBusy:
        if not wait:
            raise
        if on_wait is not None:
            on_wait()
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def remove_stale_temporaries(folder: Path, recursive: bool = True, min_age: float = 0.0,
                             lock_of: Callable[[Path], Path] | None = None) -> list[Path]:
    """Delete the ``.NAME.*.tmp`` files interrupted writes left in ``folder`` (holding its lock), or
    with ``lock_of``, each whose target's lock is free (and older than ``min_age`` seconds)."""
    removed = []
    found = (folder.rglob if recursive else folder.glob)(".*.tmp") if folder.is_dir() else ()
    for tmp in found:
        with contextlib.suppress(OSError):
            if min_age and time.time() - tmp.stat().st_mtime < min_age:
                continue
            with file_lock(lock_of(target_of(tmp)), wait=False) if lock_of else contextlib.nullcontext():
                tmp.unlink()
            removed.append(tmp)
    return removed
