"""Every epoch ends with a resumable ``checkpoints/last.ckpt``, whatever validation accuracy did
(issue 14, item 1): the best-accuracy checkpoint is a callback of its own."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_last_checkpoint_is_the_last_epoch_even_when_accuracy_stalls(tiny_run) -> None:
    # a learning rate too small to change a prediction: validation accuracy never improves after
    # epoch 1, so a save_last tied to the best-accuracy checkpoint would stay at epoch 1
    cfg, metrics, run = tiny_run("trainer.max_epochs=3", "optimizer.lr=1e-12")
    last = _load(run / "checkpoints" / "last.ckpt")
    assert last["epoch"] == 2
    assert last["global_step"] == metrics["global_step"] == 3 * 3  # debug=limit: 3 batches/epoch
    best = sorted((run / "checkpoints").glob("epoch*.ckpt"))
    assert [p.name for p in best] == ["epoch00.ckpt"]
    assert _load(best[0])["global_step"] == 3


@pytest.mark.slow  # default suite under 4 min; runs in CI's slow pass
def test_resuming_a_finished_run_trains_nothing(tiny_run, tmp_path: Path) -> None:
    """`ckpt_path=last` on a finished run only redoes the final evaluation."""
    _, first, run = tiny_run("trainer.max_epochs=2")
    before = _load(run / "checkpoints" / "last.ckpt")
    _, again, _ = tiny_run("trainer.max_epochs=2", f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}")
    assert again["global_step"] == first["global_step"] == before["global_step"]
    for key in ("train_accuracy", "val_accuracy", "test_accuracy", "test_loss"):
        assert again[key] == first[key], key
