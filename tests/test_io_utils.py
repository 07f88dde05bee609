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


def test_sweep_removes_what_a_killed_safetensors_writer_left(tmp_path: Path) -> None:
    """Issue 24 item 7: ``safetensors.torch.save_file`` makes its own ``.tmpXXXXXX`` beside its
    target; one left by a killed writer goes with the run folder's sweep (its age decides when
    another job may be writing)."""
    stray, young = tmp_path / "bundle" / ".tmpQ3x9Zk", tmp_path / ".tmpAAAAAA"
    stray.parent.mkdir()
    for p in (stray, young):
        p.write_bytes(b"half")
    keep = [tmp_path / ".tmprc", tmp_path / "tmpQ3x9Zk", tmp_path / ".tmpQ3x9Zk.json"]
    for p in keep:
        p.write_text("not a temporary")
    old = time.time() - 120
    os.utime(stray, (old, old))
    assert remove_stale_temporaries(tmp_path, min_age=60) == [stray]
    assert remove_stale_temporaries(tmp_path) == [young] and all(p.exists() for p in keep)


def test_safetensors_written_through_atomic_write_read_by_the_library(tmp_path: Path) -> None:
    """``write_safetensors``: safetensors' own reader loads every dtype and shape back, and
    nothing but the file is left beside it."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    from spam_lightning.io_utils import write_safetensors

    tensors = {"w": torch.randn(3, 5).to(torch.bfloat16), "ids": torch.arange(7), "none": torch.zeros(0, 4),
               "mask": torch.tensor([True, False]), "column": torch.randn(4, 4)[:, 1]}
    path = write_safetensors(tmp_path / "model.safetensors", tensors, {"format": "pt"})
    back = load_file(str(path))
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], t) for k, t in tensors.items())
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert os.listdir(tmp_path) == ["model.safetensors"]
