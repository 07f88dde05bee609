"""Runs and resume (issues 14, 24): a resume refuses other settings and other data, one run per
run folder and one folder per run (whatever the clock says), a finished run's folder is only
resumed, a checkpoint continues in another folder, stale checkpoint temporaries removed, a
non-finite loss stops the run naming the step, runs that would train or measure nothing refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from _compose import compose_train
from conftest import TINY_RUN

from spam_lightning.train import train
from spam_lightning.training.callbacks.finite_loss import NonFiniteLossError
from spam_lightning.training.callbacks.run_config import DataChangedError
from spam_lightning.training.checks import ConfigError
from spam_lightning.training.run_lock import RunFolderBusy, RunFolderTaken

REPO = Path(__file__).resolve().parents[1]
# `python train.py` with Hydra's clock stopped at one second: every command "starts in the
# same second" (and a clock that repeats itself, set back or coarse, does the same)
FROZEN_CLOCK = textwrap.dedent("""
    import datetime, sys
    import hydra.core.utils

    class Frozen(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2026, 1, 1, 12, 0, 0)

    hydra.core.utils.datetime = Frozen
    from spam_lightning.train import main
    sys.argv[0] = "train.py"
    main()
""")


def cli(args: list[str], cwd: Path, clock: str | None = None) -> subprocess.CompletedProcess:
    """``python train.py ARGS`` in ``cwd`` (``clock``: a script that stops Hydra's clock)."""
    head = [sys.executable, "-c", clock] if clock else [sys.executable, str(REPO / "train.py")]
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([*head, *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env=env)


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


@pytest.mark.slow  # subprocesses / two runs: CI's slow pass
def test_runs_started_in_the_same_second_get_folders_of_their_own(tmp_path, sms_file) -> None:
    """Two commands in the same second: each its own run folder (before: the second rewrote the
    first's .hydra/ and train.log, then was refused), and two sweeps their own sweep folders."""
    data = [f"data.source={sms_file}", f"paths.data_dir={tmp_path / 'data'}"]
    for seed in (1, 2):
        proc = cli(["model=majority", f"seed={seed}", *data], tmp_path, FROZEN_CLOCK)
        assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted(p for p in (tmp_path / "outputs" / "runs").iterdir() if not p.is_symlink())
    assert [p.name[:19] for p in runs] == ["2026-01-01_12-00-00"] * 2, runs
    for run in runs:  # each folder: its own command's overrides, log and results
        seed = json.loads((run / "metrics.json").read_text())["seed"]
        assert f"seed={seed}" in (run / ".hydra" / "overrides.yaml").read_text()
        assert "Error" not in (run / "train.log").read_text()
    assert {json.loads((r / "metrics.json").read_text())["seed"] for r in runs} == {1, 2}
    for seed in ("1", "2"):
        proc = cli(["-m", "model=majority", f"seed={seed}", *data], tmp_path, FROZEN_CLOCK)
        assert proc.returncode == 0, proc.stderr[-3000:]
    sweeps = sorted((tmp_path / "outputs" / "multirun").iterdir())
    assert len(sweeps) == 2
    assert {json.loads((s / "0" / "metrics.json").read_text())["seed"] for s in sweeps} == {1, 2}


@pytest.mark.slow
def test_a_finished_runs_folder_is_only_resumed(tiny_run, tmp_path, sms_file, tiny_data_dir) -> None:
    """`hydra.run.dir=<a finished run>` with other settings is refused before Hydra writes into
    the folder; `ckpt_path=last` with the run's settings continues it (no last-v1.ckpt)."""
    _, first, run = tiny_run()
    kept = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".run.lock"}
    same = [*TINY_RUN, f"data.source={sms_file}", f"paths.data_dir={tiny_data_dir}",
            f"hydra.run.dir={run}"]
    for extra, says in ((["seed=5"], "holds a finished run"),
                        (["seed=5", "ckpt_path=last"], "seed: 123 → 5")):
        proc = cli([*same, *extra], tmp_path)
        assert proc.returncode == 1 and says in proc.stderr, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr
        assert {p: p.read_bytes() for p in kept} == kept  # .hydra/, train.log, results untouched
    with pytest.raises(RunFolderTaken, match="holds a finished run"):  # in-process: train() too
        train(compose_train([*same[:-1], "seed=5"], tmp_path))
    _, again, _ = tiny_run("trainer.max_epochs=2", "ckpt_path=last")
    assert again["global_step"] == 2 * first["global_step"]
    assert sorted(p.name for p in (run / "checkpoints").glob("last*")) == ["last.ckpt"]


def test_resume_on_changed_data_is_refused(tiny_run, tmp_path) -> None:
    """The same settings on a CSV whose labels flipped after epoch 1: refused, naming the split."""
    table = tmp_path / "table.csv"
    rows = [(f"win a prize number {i}", "spam") if i % 2 else (f"see you at {i}", "ham")
            for i in range(120)]
    table.write_text("text,label\n" + "".join(f"{t},{lab}\n" for t, lab in rows))
    data = ["data=csv", f"data.source={table}"]
    tiny_run(*data)
    flipped = {"spam": "ham", "ham": "spam"}
    table.write_text("text,label\n" + "".join(f"{t},{flipped[lab]}\n" for t, lab in rows))
    with pytest.raises(DataChangedError) as err:
        tiny_run(*data, "ckpt_path=last", "trainer.max_epochs=2")
    message = str(err.value)
    assert "trained on other data" in message and "train: sha256" in message, message
    assert _load(tmp_path / "run" / "checkpoints" / "last.ckpt")["epoch"] == 0  # nothing trained


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.slow  # subprocesses / two runs: CI's slow pass
def test_a_checkpoint_continues_in_another_folder(tiny_run, tmp_path, sms_file, tiny_data_dir) -> None:
    """`ckpt_path=<another run's last.ckpt>` in a new folder: paths under the run folders differ
    (checkpoint dirpath, logs), so were refused; the run continues there, the old one untouched."""
    _, first, old = tiny_run()
    before = (old / "checkpoints" / "last.ckpt").read_bytes()
    work = tmp_path / "elsewhere"
    cfg = compose_train([*TINY_RUN, f"data.source={sms_file}", f"paths.data_dir={tiny_data_dir}",
                         "trainer.max_epochs=2", f"ckpt_path={old / 'checkpoints' / 'last.ckpt'}"], work)
    metrics = train(cfg)
    assert metrics["global_step"] == 2 * first["global_step"]
    assert _load(work / "run" / "checkpoints" / "last.ckpt")["global_step"] == metrics["global_step"]
    assert (old / "checkpoints" / "last.ckpt").read_bytes() == before
    with pytest.raises(ConfigError, match="optimizer.lr: 5e-05 → 0.001"):  # settings still count
        train(compose_train([*TINY_RUN, f"data.source={sms_file}", "optimizer.lr=0.001",
                             f"ckpt_path={old / 'checkpoints' / 'last.ckpt'}"], tmp_path / "third"))


@pytest.mark.parametrize("limit", ["trainer.limit_train_batches=0", "trainer.limit_train_batches=0.0",
                                   "trainer.limit_test_batches=0"])
def test_limits_that_train_or_measure_nothing_are_refused_before_work(tiny_run, tmp_path, limit) -> None:
    with pytest.raises(ConfigError, match=f"{limit.replace('.', '[.]')} (trains nothing|leaves)"):
        tiny_run(limit)
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow  # subprocesses / two runs: CI's slow pass
def test_a_fraction_below_one_batch_is_a_config_error(tiny_run) -> None:
    """Lightning's own refusal (found once the data is read) is one message, not a traceback."""
    with pytest.raises(ConfigError, match="limit_val_batches"):
        tiny_run("trainer.limit_val_batches=0.0001")
