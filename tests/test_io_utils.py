"""The one file infrastructure (issue 22 item 5): atomic write, stale-temporary sweep, lock."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from spam_lightning.io_utils import (
    LockBusy,
    atomic_write,
    file_lock,
    remove_stale_temporaries,
    target_of,
)


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "a.json"
    atomic_write(target, lambda tmp: tmp.write_text("one"))

    def crash(tmp: Path) -> None:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        atomic_write(target, crash)
    assert target.read_text() == "one" and os.listdir(target.parent) == ["a.json"]
    assert target.stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_sweep_spares_what_is_not_stale(tmp_path: Path) -> None:
    """Only ``.NAME.*.tmp`` files go; with ``lock_of`` only those old enough whose target's lock is
    free (a job is writing the others right now)."""
    (tmp_path / "notes.tmp").write_text("mine")
    busy, free, young = (tmp_path / f".{n}.safetensors.x1.tmp" for n in ("busy", "free", "young"))
    for p in (busy, free, young):
        p.write_bytes(b"half")
    old = time.time() - 120
    os.utime(busy, (old, old))
    os.utime(free, (old, old))
    assert target_of(busy) == tmp_path / "busy.safetensors"
    lock_of = lambda target: Path(f"{target}.lock")  # noqa: E731
    with file_lock(lock_of(target_of(busy))):
        removed = remove_stale_temporaries(tmp_path, recursive=False, min_age=60, lock_of=lock_of)
    assert removed == [free] and busy.exists() and young.exists()
    assert remove_stale_temporaries(tmp_path) and sorted(os.listdir(tmp_path)) == [
        "busy.safetensors.lock", "free.safetensors.lock", "notes.tmp"]


def test_lock_refuses_at_once_or_waits(tmp_path: Path) -> None:
    waited = []
    with file_lock(tmp_path / "x.lock"):
        with pytest.raises(LockBusy), file_lock(tmp_path / "x.lock", wait=False):
            pass
    with file_lock(tmp_path / "x.lock", on_wait=lambda: waited.append(1)):
        pass
    assert waited == []  # free: taken without waiting
