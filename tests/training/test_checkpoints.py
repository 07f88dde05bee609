"""Every epoch ends with a resumable ``checkpoints/last.ckpt``, whatever validation accuracy did
(issue 14, item 1): the best-accuracy checkpoint is a callback of its own."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _weights import hf_weights


def _load(path: Path) -> dict:
    from spam_lightning.training.callbacks import load_checkpoint_safely

    return load_checkpoint_safely(path)


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


def test_checkpoints_keep_what_trains_and_the_best_is_a_link_to_last(tiny_run) -> None:
    import os

    _, _, run = tiny_run()
    last = _load(run / "checkpoints" / "last.ckpt")
    kept = set(last["state_dict"])  # last_block of 2 blocks: what trains
    assert all(k.startswith(("model.trf_blocks.1.", "model.final_norm.", "model.out_head.")) for k in kept)
    assert {"model.trf_blocks.1.att.W_query.weight", "model.final_norm.scale", "model.out_head.weight"} <= kept
    base = last["frozen_base"]
    assert base["identity"] == {"name": "gpt2-tiny", "source": "random", "seed": 123}
    assert "model.tok_emb.weight" in base["shapes"] and "model.trf_blocks.0.att.W_query.weight" in base["shapes"]
    assert not set(base["shapes"]) & set(last["state_dict"]) and len(base["sha256"]) == 64
    best = run / "checkpoints" / "epoch00.ckpt"  # written at the same step: the same file
    assert os.stat(best).st_ino == os.stat(run / "checkpoints" / "last.ckpt").st_ino


def test_resume_needs_the_base_it_trained_on(tiny_run, tmp_path: Path) -> None:
    from spam_lightning.model.weights import CheckpointError
    from spam_lightning.training.checks import ConfigError

    weights = hf_weights(tmp_path / "model.safetensors", seed=0)
    base = ["model.weights=pretrained", f"model.checkpoint={weights}"]
    _, _, run = tiny_run(*base)
    resume = [*base, "trainer.max_epochs=2", f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}"]
    hf_weights(weights, seed=1)  # the file changed since: other frozen weights
    with pytest.raises(CheckpointError) as err:
        tiny_run(*resume)
    assert f"{weights}" in str(err.value) and "sha256" in str(err.value)
    assert "resume with the model.* and seed settings" in str(err.value)
    weights.unlink()  # gone: refused by the config checks, before any data work
    with pytest.raises(ConfigError, match=f"model.checkpoint={weights}: no such file"):
        tiny_run(*resume)


def test_a_finished_runs_checkpoints_keep_the_bundles_tensors_once(tiny_run, tmp_path: Path) -> None:
    """The bundle and last.ckpt hold the same trained tensors: after the bundle is written the
    checkpoint names them in weights-<sha>.safetensors, a hard link to the bundle's file, so the
    run folder holds them once; loading puts them back, and a missing or changed file is refused."""
    import io
    import os

    from safetensors.torch import load_file

    from spam_lightning.model.weights import CheckpointError

    _, _, run = tiny_run()
    folder = run / "checkpoints"
    (weights,) = folder.glob("weights-*.safetensors")
    bundle = run / "bundle" / "model.safetensors"
    assert os.stat(weights).st_ino == os.stat(bundle).st_ino  # one copy on disk
    assert os.stat(folder / "epoch00.ckpt").st_ino == os.stat(folder / "last.ckpt").st_ino
    raw = torch.load(folder / "last.ckpt", map_location="cpu", weights_only=True)
    shared = raw["shared_tensors"]
    assert shared["file"] == weights.name and not set(shared["keys"]) & set(raw["state_dict"])
    assert "model.out_head.weight" in shared["keys"] and raw["optimizer_states"]
    tensors, whole = load_file(bundle), _load(folder / "last.ckpt")
    assert all(torch.equal(whole["state_dict"][k], tensors[n]) for k, n in shared["keys"].items())
    trained = sum(t.numel() * t.element_size() for t in tensors.values())
    buffer = io.BytesIO()
    torch.save(whole, buffer)  # the same checkpoint whole is larger by the shared tensors' bytes
    assert buffer.getbuffer().nbytes - (folder / "last.ckpt").stat().st_size >= trained

    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "last.ckpt").write_bytes((folder / "last.ckpt").read_bytes())
    with pytest.raises(CheckpointError, match=f"keeps its trained tensors in {copy / weights.name}, which is missing"):
        _load(copy / "last.ckpt")
    changed = load_file(weights)
    changed["out_head.weight"] += 1
    from safetensors.torch import save_file

    save_file(changed, copy / weights.name)
    with pytest.raises(CheckpointError, match="has changed since .its sha256 differs."):
        _load(copy / "last.ckpt")
