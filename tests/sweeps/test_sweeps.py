"""Parallel and cluster sweeps: joblib, submitit (composition only) and Optuna (issue 8)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from _compose import compose_train
from conftest import TINY_RUN

REPO = Path(__file__).resolve().parents[2]
# the whole test split, so each trial's final test accuracy is the chapter's 300 messages
FAST = [*TINY_RUN, "trainer.limit_test_batches=null"]


def sweep(args: list[str], work: Path, sms_file: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "train.py"),
            *args,
            *FAST,
            f"data.source={sms_file}",
            f"paths.data_dir={work / 'data'}",
            f"hydra.sweep.dir={work / 'sweep'}",
        ],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"STDOUT\n{proc.stdout[-3000:]}\nSTDERR\n{proc.stderr[-6000:]}"
    return proc


@pytest.mark.slow  # Optuna + joblib workers: imports in every worker
def test_optuna_trials_run_in_parallel_through_joblib(tmp_path: Path, sms_file: Path) -> None:
    """Both features in one sweep (each job costs seconds of imports): Optuna asks for 2 trials,
    the joblib launcher runs them as 2 parallel jobs, our Hydra callback summarises them."""
    proc = sweep(
        [
            "hparams_search=optuna",
            "hydra.sweeper.n_trials=2",
            "hydra.sweeper.n_jobs=2",
            "hydra/launcher=joblib",
            "hydra.launcher.n_jobs=2",
        ],
        tmp_path,
        sms_file,
    )
    assert "Joblib.Parallel(n_jobs=2" in proc.stdout + proc.stderr
    root = tmp_path / "sweep"
    trials = []
    for job in ("0", "1"):
        m = json.loads((root / job / "metrics.json").read_text())
        assert m["test_count"] == 300 and m["model"] == "gpt2-tiny"
        assert (root / job / "bundle" / "model.safetensors").is_file()
        trials.append(m)
    results = yaml.safe_load((root / "optimization_results.yaml").read_text())
    assert set(results["best_params"]) == {
        "optimizer.lr",
        "optimizer.weight_decay",
        "trainable",
        "token",
    }
    assert 1e-5 <= results["best_params"]["optimizer.lr"] <= 1e-3
    # what train.py's main returned (cfg.optimized_metric) is what Optuna maximised
    assert results["best_value"] == max(t["val_accuracy"] for t in trials)
    best = max(trials, key=lambda t: t["val_accuracy"])
    assert (best["trainable"], best["token"]) == (
        results["best_params"]["trainable"],
        results["best_params"]["token"],
    )
    # the summary written in the main process when the multirun ends: one row per trial
    rows = list(csv.DictReader((root / "summary.csv").open()))
    assert len(rows) == 2 and all(r["Status"] == "ok" for r in rows)
    assert "Validation acc" in (root / "summary.md").read_text()


def test_optuna_search_space(tmp_path: Path) -> None:
    cfg = compose_train(["hparams_search=optuna"], tmp_path)
    assert cfg.optimized_metric == "val_accuracy"
    sweeper = cfg.hydra.sweeper
    assert sweeper.direction == "maximize"
    assert set(sweeper.params) == {"optimizer.lr", "optimizer.weight_decay", "trainable", "token"}


def test_submitit_slurm_config_composes(tmp_path: Path) -> None:
    cfg = compose_train(
        [
            "hydra/launcher=submitit_slurm",
            "hydra.launcher.partition=gpu",
            "hydra.launcher.gpus_per_node=2",
            "hydra.launcher.tasks_per_node=2",
            "hydra.launcher.timeout_min=60",
            "trainer=ddp",
            "trainer.devices=2",
        ],
        tmp_path,
    )
    launcher = cfg.hydra.launcher
    assert (
        launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    )
    assert (launcher.partition, launcher.gpus_per_node, launcher.tasks_per_node) == ("gpu", 2, 2)
    assert launcher.timeout_min == 60 and cfg.trainer.strategy == "ddp"


@pytest.mark.slow  # a two-job sweep in a subprocess
def test_a_sweep_with_a_failed_job_still_writes_its_summary(tmp_path: Path) -> None:
    """Issue 29 item 2, as a user runs it offline: gpt2-small's pretrained weights are unavailable,
    so its job fails; the sweep exits 1 and the summary shows the failed row and says where."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "-m", "model=gpt2-tiny,gpt2-small", "trainer.max_epochs=1",
         "debug=limit"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={"PATH": str(Path(sys.executable).parent), "HOME": str(tmp_path)},  # a clean environment
    )
    assert proc.returncode == 1
    (sweep_dir,) = (tmp_path / "outputs" / "multirun").iterdir()
    rows = list(csv.DictReader((sweep_dir / "summary.csv").open()))
    assert [(r["Model"], r["Status"]) for r in rows] == [("gpt2-tiny", "ok"), ("gpt2-small", "failed (1/1)")]
    assert f"Job 1 failed (model=gpt2-small, trainer.max_epochs=1, debug=limit): {sweep_dir / '1' / 'train.log'}" in proc.stderr
    assert f"1 of 2 rows failed so far; summary: {sweep_dir / 'summary.md'}" in proc.stderr
