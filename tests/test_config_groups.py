"""The config groups a Lightning + Hydra user expects (issue 12 item 7): debug/, logger/ and
callbacks/none compose, and a tiny run with each one finishes and leaves what it promises."""

from __future__ import annotations

import csv
import json

import pytest
from _compose import CONF, compose_train

NEW_OPTIONS = {
    "debug": {"fdr", "limit", "overfit", "profiler"},
    "logger": {"tensorboard", "csv", "wandb", "mlflow", "none"},
    "callbacks": {"default", "none", "early_stopping"},
    "optimizer": {"adamw", "sgd"},
    "scheduler": {"none", "linear_warmup", "cosine"},
}


def test_every_option_on_disk_is_tested_here():
    for group, names in NEW_OPTIONS.items():
        on_disk = {p.stem for p in (CONF / group).glob("*.yaml")}
        if group == "debug":
            on_disk.remove("default")  # what the others share, not an option of its own
        assert on_disk == names, group


def test_defaults_are_tensorboard_and_no_debug(tmp_path):
    cfg = compose_train([], tmp_path)
    assert set(cfg.logger) == {"tensorboard"}
    assert cfg.trainer.fast_dev_run is False and cfg.trainer.overfit_batches == 0.0
    assert cfg.hydra.runtime.choices.debug is None


@pytest.mark.parametrize("option", sorted(f"{g}={n}" for g, ns in NEW_OPTIONS.items() for n in ns))
def test_option_composes(option, tmp_path):
    cfg = compose_train([option], tmp_path)
    group, name = option.split("=")
    assert cfg.hydra.runtime.choices[group] == name
    if group == "debug":  # every debug config runs one CPU epoch with anomaly detection
        assert cfg.trainer.accelerator == "cpu" and cfg.trainer.detect_anomaly is True


def test_debug_fdr_is_fast_dev_run(tiny_run):
    cfg, metrics, run = tiny_run("debug=fdr")
    assert cfg.trainer.fast_dev_run is True
    assert metrics["global_step"] == 1 and metrics["examples_seen"] == 8
    assert metrics["test_count"] == metrics["val_count"] == 8  # one batch of each split
    assert json.loads((run / "metrics.json").read_text())["global_step"] == 1


def test_debug_limit_runs_a_few_batches(tiny_run):
    cfg, metrics, run = tiny_run("debug=limit")
    assert (cfg.trainer.limit_train_batches, cfg.trainer.limit_val_batches) == (3, 2)
    assert metrics["global_step"] == 3 and metrics["examples_seen"] == 24
    assert metrics["val_count"] == metrics["test_count"] == 16
    history = json.loads((run / "history.json").read_text())
    assert len(history["train_losses"]) == 3  # eval_freq=1: the chapter monitor at every step


def test_debug_overfit_repeats_the_same_batches(tiny_run):
    cfg, metrics, _ = tiny_run(
        "debug=overfit", "trainer.max_epochs=2", "trainer.limit_test_batches=1", "eval_iter=1"
    )
    assert cfg.trainer.overfit_batches == 3
    assert metrics["epochs"] == 2 and metrics["global_step"] == 6 and metrics["examples_seen"] == 48


@pytest.mark.slow  # default suite under 4 min; runs in CI's slow pass
def test_debug_profiler_writes_its_report(tiny_run):
    _, _, run = tiny_run(
        "debug=profiler", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
    )
    report = (run / "fit-profiler.txt").read_text()
    assert "Action" in report and "run_training_epoch" in report
    assert (run / "test-profiler.txt").is_file()


def test_logger_csv(tiny_run):
    _, metrics, run = tiny_run("logger=csv")
    rows = list(csv.DictReader((run / "csv" / "metrics.csv").open()))
    assert any(r.get("hparams/test_accuracy") for r in rows)
    final = next(r for r in rows if r.get("hparams/test_accuracy"))
    assert float(final["hparams/test_accuracy"]) == pytest.approx(metrics["test_accuracy"])
    assert "lr" in (run / "csv" / "hparams.yaml").read_text()


@pytest.mark.slow  # default suite under 4 min; runs in CI's slow pass
def test_logger_wandb_offline(tiny_run):
    import wandb

    try:
        cfg, _, run = tiny_run("logger=wandb", "logger.wandb.offline=true")
    finally:
        wandb.finish()
    assert cfg.logger.wandb.project == "spam-lightning"
    (offline,) = (run / "wandb").glob("offline-run-*")
    assert list(offline.glob("run-*.wandb"))  # what `wandb sync` uploads later


@pytest.mark.slow  # default suite under 4 min; runs in CI's slow pass
def test_logger_mlflow_local_file_store(tiny_run):
    # a local file store inside the run folder (the default is outputs/mlruns, shared by runs)
    cfg, metrics, run = tiny_run("logger=mlflow", "logger.mlflow.tracking_uri=file:${paths.output_dir}/mlruns")
    assert cfg.logger.mlflow.tracking_uri == f"file:{run}/mlruns"
    (final,) = (run / "mlruns").glob("*/*/metrics/hparams/test_accuracy")
    _, value, _ = final.read_text().split()  # timestamp value step
    assert float(value) == pytest.approx(metrics["test_accuracy"])
    assert (final.parents[2] / "params" / "lr").is_file()


def test_callbacks_none(tiny_run):
    cfg, metrics, run = tiny_run("callbacks=none")
    assert not cfg.callbacks
    assert metrics["global_step"] == 3 and metrics["examples_seen"] is None  # no chapter monitor
    assert (run / "metrics.json").is_file() and (run / "bundle" / "model.safetensors").is_file()
    assert not (run / "history.json").exists() and not (run / "loss-plot.png").exists()
    # only Lightning's default checkpoint, not ours (epochNN.ckpt + last.ckpt, best val/acc)
    assert [p.name for p in run.rglob("*.ckpt")] == ["epoch=0-step=3.ckpt"]
