"""Issue 24 item 6: a full disk, through the user's command (`python train.py ...`, Hydra's main
in-process). The fault: the file system reports ENOSPC when a file under one folder is flushed
(``os.fsync`` inside the one atomic_write; where a real full disk reports it at a write, the
same OSError takes the same way out)."""

from __future__ import annotations

import errno
import logging
import os
import sys
from pathlib import Path

import pytest
import torch

from spam_lightning.io_utils import NoSpaceError, atomic_write
from spam_lightning.training.callbacks.checkpoint_io import save_torch

SMOKE = ["model=gpt2-tiny", "debug=limit"]


def full_under(monkeypatch: pytest.MonkeyPatch, folder: str, when=lambda name: True) -> list[str]:
    """Every fsync of a file under ``folder`` (whose name satisfies ``when``) fails as a full disk."""
    real, refused = os.fsync, []

    def fsync(fd: int) -> None:
        name = os.readlink(f"/proc/self/fd/{fd}")
        if f"/{folder}/" in name and when(name):
            refused.append(name)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return refused


def train_py(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, *overrides: str) -> tuple[int, Path]:
    """``python train.py overrides`` in ``tmp_path`` -> (exit code, run folder)."""
    from spam_lightning.train import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["train.py", *overrides])
    root = logging.getLogger()
    before, code = list(root.handlers), 0
    try:
        main()
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    finally:  # Hydra's handlers (train.log, the captured console) go with the run
        for handler in [h for h in root.handlers if h not in before]:
            root.removeHandler(handler)
            handler.close()
    (run,) = (p for p in (tmp_path / "outputs" / "runs").iterdir() if p.name != "latest")  # not the link
    return code, run


@pytest.mark.slow  # two tiny epochs through Hydra: about 20 s
def test_full_disk_writing_a_checkpoint_is_one_message_and_the_last_one_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Epoch 1's checkpoint is written; epoch 2's finds the disk full: exit 1 with one message
    (the folder, "no space left", how to continue), epoch 1's last.ckpt intact, no temporary,
    the cause in train.log, no torch traceback (``inline_container.cc``)."""
    refused = full_under(monkeypatch, "checkpoints",
                         lambda name: "/.last.ckpt." in name and Path(name).with_name("last.ckpt").exists())
    code, run = train_py(monkeypatch, tmp_path, *SMOKE, "trainer.max_epochs=2")
    err = capsys.readouterr().err
    assert code == 1 and refused, err[-3000:]
    folder = run / "checkpoints"
    assert f"Error: checkpoint: no space left on the device of {folder} to write last.ckpt" in err
    assert "the last.ckpt already there is intact" in err and "ckpt_path=last" in err
    assert "Traceback" not in err and "inline_container" not in err
    assert torch.load(folder / "last.ckpt", weights_only=True)["epoch"] == 0
    assert sorted(p.name for p in folder.iterdir()) == ["epoch00.ckpt", "last.ckpt"]
    log = (run / "train.log").read_text()
    assert "NoSpaceError: checkpoint: no space left on the device of" in log
    assert "No space left on device" in log


@pytest.mark.slow  # a tiny run through Hydra: about 15 s
def test_full_disk_writing_the_shared_trunk_cache_continues_without_sharing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """The cache's first file finds the disk full: one warning naming cache.dir, then the run
    goes on unshared (as with a read-only cache.dir) and nothing is left in the folder."""
    refused = full_under(monkeypatch, "trunk_cache")
    code, run = train_py(monkeypatch, tmp_path, *SMOKE, "data.max_length=32", "cache.trunk=true")
    out = capsys.readouterr()
    assert code == 0, out.err[-3000:]
    cache_dir = tmp_path / "outputs" / "trunk_cache"
    assert len(refused) == 1  # the later splits do not try again
    log = (run / "train.log").read_text()
    warning = f"Frozen-trunk cache: no space left in {cache_dir} to save train"
    assert log.count("Frozen-trunk cache: ") and log.count(warning) == 1
    assert "continuing without sharing" in log and "Traceback" not in out.err
    assert [p.name for p in cache_dir.iterdir() if not p.name.endswith(".lock")] == []
    assert '"trunk_cache": true' in (run / "metrics.json").read_text()


def test_atomic_write_names_the_folder_of_a_full_disk(tmp_path: Path, monkeypatch) -> None:
    """Every atomic write (metrics, config, bundle, checkpoints): ``NoSpaceError`` naming the
    folder, the previous file and nothing else left."""
    target = tmp_path / "out" / "metrics.json"
    atomic_write(target, lambda tmp: tmp.write_text("old"))
    full_under(monkeypatch, "out")
    with pytest.raises(NoSpaceError, match=f"no space left on the device of {target.parent} to "
                       "write metrics.json .*; the metrics.json already there is intact"):
        atomic_write(target, lambda tmp: tmp.write_text("new"))
    assert os.listdir(target.parent) == ["metrics.json"] and target.read_text() == "old"


def test_a_checkpoint_write_reports_a_full_disk_with_its_errno() -> None:
    """torch.save given a path raises ``RuntimeError: [enforce fail at inline_container.cc]``
    on a full disk; through a Python file it is the OSError (ENOSPC) atomic_write names."""
    with pytest.raises(OSError) as raised:
        save_torch({"w": torch.zeros(100_000)}, Path("/dev/full"))  # the kernel's always-full device
    assert raised.value.errno == errno.ENOSPC
