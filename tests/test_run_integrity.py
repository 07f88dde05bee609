"""Runs and resume (issue 14): a resume refuses other settings, one run per run folder, stale
checkpoint temporaries removed, a non-finite loss stops the run naming the step."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from spam_lightning.training.callbacks.finite_loss import NonFiniteLossError
from spam_lightning.training.checks import ConfigError
from spam_lightning.training.run_lock import RunFolderBusy


@pytest.mark.slow  # default suite under 4 min; runs in CI's slow pass
def test_resume_with_other_settings_is_refused_listing_each(tiny_run) -> None:
    _, first, run = tiny_run()
    last = run / "checkpoints" / "last.ckpt"
    changed = ("optimizer.lr=0.01", "seed=99", "token=first", "data.batch_size=4",
               "data.max_length=20")
    with pytest.raises(ConfigError) as err:
        tiny_run(*changed, f"ckpt_path={last}")
    message = str(err.value)
    for line in ("optimizer.lr: 5e-05 → 0.01", "seed: 123 → 99", "token.name: last → first",
                 "data.batch_size: 8 → 4", "data.max_length: None → 20"):
        assert line in message, message
    assert "another folder" in message
    # what cannot change results may differ: how long to train, logging, progress, workers
    _, again, _ = tiny_run("trainer.max_epochs=2", "trainer.log_every_n_steps=1",
                           "trainer.enable_progress_bar=true", f"ckpt_path={last}")
    assert again["global_step"] == 2 * first["global_step"]


HOLD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from spam_lightning.training.run_lock import run_folder_lock
    with run_folder_lock(Path(sys.argv[1])):
        print("held", flush=True)
        time.sleep(60)
""")


def test_second_run_in_a_busy_folder_is_refused_with_the_holders_pid(tiny_run, tmp_path) -> None:
    folder = tmp_path / "run"
    folder.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunFolderBusy) as err:
            tiny_run()
        assert f"in use by another run (PID {holder.pid})" in str(err.value)
        assert not (folder / "metrics.json").exists()  # refused before any work
    finally:
        holder.kill()
        holder.wait()
    _, metrics, run = tiny_run()  # the lock dies with its process: the folder is free again
    assert run == folder and (run / "metrics.json").is_file()
    assert not (run / ".run.pid").exists()


def test_stale_checkpoint_temporaries_are_removed_at_start(tiny_run, tmp_path) -> None:
    stale = tmp_path / "run" / "checkpoints" / ".last.ckpt.x1y2z3.tmp"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"\0" * 4096)  # what a kill during torch.save leaves
    keep = tmp_path / "run" / "checkpoints" / "notes.tmp"  # not an atomic write's temporary
    keep.write_text("mine")
    tiny_run()
    assert not stale.exists() and keep.read_text() == "mine"


def test_non_finite_loss_stops_the_run_naming_the_step(tiny_run, tmp_path) -> None:
    # lr 1e30: AdamW's first steps move every trainable weight by ~1e30, the logits overflow
    # (without debug=limit's detect_anomaly, which stops inside backward, as the default run is)
    with pytest.raises(NonFiniteLossError) as err:
        tiny_run("optimizer.lr=1e30", "trainer.max_epochs=3", "trainer.detect_anomaly=false")
    message = str(err.value)
    assert "the training loss is nan" in message or "the training loss is inf" in message
    assert ", step " in message and "training stopped" in message
    assert not (tmp_path / "run" / "metrics.json").exists()  # no results from a diverged run


@pytest.mark.parametrize("trainable", ["last_block", "lora"])
def test_unsharded_copy_bundles_the_same_weights(tmp_path, trainable) -> None:
    """What rank 0 bundles under FSDP (the gathered full state assigned into a copy built on
    the meta device) equals the bundle of the model itself, LoRA merged included."""
    import torch
    from _compose import compose_train
    from safetensors.torch import load_file

    from spam_lightning.inference.bundle import save_bundle
    from spam_lightning.model.gpt2 import GPT2Family, build_model

    cfg = compose_train(["model=gpt2-tiny", "model.weights=random", f"trainable={trainable}"], tmp_path)
    trained = build_model(cfg, 2)
    torch.manual_seed(5)
    for p in trained.parameters():  # as if trained: LoRA's B is no longer zero
        p.data.normal_(0, 0.1)
    copy = GPT2Family().unsharded_copy(cfg, {k: v.clone() for k, v in trained.state_dict().items()}, 2)
    opts = dict(class_names=["ham", "spam"], token="last", max_length=8, padding="longest",
                pad_token_id=50256)
    save_bundle(tmp_path / "a", trained, **opts)
    save_bundle(tmp_path / "b", copy, **opts)
    a, b = (load_file(tmp_path / d / "bundle" / "model.safetensors") for d in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
