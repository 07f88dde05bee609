"""Experiment configs resolve to their intended settings; a multirun writes its summary (issue 5)."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from _compose import CONF, compose_train
from conftest import TINY_RUN
from omegaconf import OmegaConf

from spam_lightning.sweeps.summary import summarize

REPO = Path(__file__).resolve().parents[1]

# The chapter's setup (row 01); each experiment below states only what it changes.
BASE = {
    "model.name": "gpt2-small",
    "model.weights": "pretrained",
    "model.causal_mask": True,
    "trainable.name": "last_block",
    "token.name": "last",
    "data.max_length": None,
    "data.padding": "longest",
    "data.batch_size": 8,
    "trainer.accumulate_grad_batches": 1,
    "trainer.precision": "32-true",
    "trainer.max_epochs": 5,
    "loss.ignore_index": -100,
    "optimizer.lr": 5e-5,
    "optimizer.weight_decay": 0.1,
    "seed": 123,
    "data.split": "chapter",
}

EXPECTED: dict[str, dict] = {
    "chapter": {},
    "exercise_6_1": {"data.max_length": "model"},
    "exercise_6_2": {"trainable.name": "all"},
    "exercise_6_3": {"token.name": "first"},
    "fast": {
        "token.name": "flexible", "data.padding": "batch", "data.bucketing": True,
        "cache.trunk": "auto", "trainer.precision": "bf16-mixed",
    },
    "table/row01": {"reference.test_acc": 95.00},
    "table/row02": {"token.name": "first", "reference.test_acc": 75.00},
    "table/row03": {"trainable.name": "last_layer", "reference.test_acc": 72.00},
    "table/row04": {"trainable.name": "last_two_blocks", "reference.test_acc": 98.33},
    "table/row05": {"trainable.name": "all", "reference.test_acc": 96.67},
    "table/row06": {"model.name": "gpt2-medium", "model.emb_dim": 1024, "reference.test_acc": 84.67},
    "table/row07": {"model.name": "gpt2-large", "model.n_layers": 36, "reference.test_acc": 96.67},
    "table/row08": {"model.name": "gpt2-xl", "model.emb_dim": 1600, "reference.test_acc": 98.33},
    "table/row09": {"model.name": "gpt2-xl", "trainable.name": "all", "reference.test_acc": 98.67},
    "table/row10": {"model.weights": "random", "trainable.name": "all", "reference.test_acc": 93.67},
    "table/row11": {
        "trainable.name": "lora", "trainable.rank": 16, "trainable.alpha": 16,
        "reference.test_acc": 96.67,
    },
    "table/row12": {
        "model.name": "gpt2-xl", "trainable.name": "lora", "trainable.rank": 16,
        "trainable.alpha": 8, "reference.test_acc": 98.33,
    },
    "table/row13": {"data.max_length": "model", "reference.test_acc": 78.33},
    "table/row14": {"data.padding": "none", "data.batch_size": 1, "reference.test_acc": 98.00},
    "table/row15": {
        "data.padding": "none", "data.batch_size": 1, "trainer.accumulate_grad_batches": 8,
        "reference.test_acc": 98.33,
    },
    "table/row16": {"token.name": "flexible", "reference.test_acc": 98.33},
    "table/row17": {"model.causal_mask": False, "reference.test_acc": 95.33},
    "table/row18": {"loss.ignore_index": 50256, "reference.test_acc": 95.00},
    # the book's --average_embeddings: every position, padding included (not masked_mean)
    "table/row19": {"token.name": "mean", "reference.test_acc": 96.33},
}


def test_every_experiment_config_is_tested():
    on_disk = {
        str(p.relative_to(CONF / "experiment").with_suffix(""))
        for p in (CONF / "experiment").rglob("*.yaml")
        if not p.relative_to(CONF / "experiment").parts[0] == "compare"  # tests/test_compare.py
    }
    assert on_disk == set(EXPECTED)
    assert len([k for k in EXPECTED if k.startswith("table/")]) == 19


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_experiment_resolves(name, tmp_path):
    cfg = compose_train([f"experiment={name}"], tmp_path)
    # the follow-up table's rows use its script's split (additional_experiments.py)
    split = {"data.split": "bonus"} if name.startswith("table/") else {}
    want = {**BASE, **split, **EXPECTED[name]}
    for key, value in want.items():
        assert OmegaConf.select(cfg, key, throw_on_missing=True) == value, (name, key)
    # everything resolves (no dangling interpolation) and the data module gets the model's context
    container = OmegaConf.to_container(cfg.data, resolve=True)
    assert container["context_length"] == cfg.model.context_length == 1024
    if not name.startswith("table/"):
        assert cfg.reference is None


def test_max_length_model_means_context_length(tmp_path):
    from hydra.utils import instantiate

    cfg = compose_train(["experiment=exercise_6_1", "model=gpt2-tiny"], tmp_path)
    dm = instantiate(cfg.data)
    assert dm.hparams.max_length == "model"


@pytest.mark.slow  # a 4-job sweep in a subprocess
def test_multirun_writes_summary_with_mean_and_std(tmp_path, sms_file):
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [
            sys.executable, str(REPO / "train.py"), "-m", *TINY_RUN,
            "trainable=last_layer,last_block", "token=last,flexible", "seed=1,2",
            f"data.source={sms_file}", f"paths.data_dir={tmp_path / 'data'}",
            "callbacks.model_checkpoint=null", "callbacks.last_checkpoint=null", f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert len(rows) == 4
    for row in rows:
        assert row["Seeds"] == "2" and row["Status"] == "ok"
        assert row["Model"] == "gpt2-tiny" and row["Weights"] == "random"
        assert "±" in row["Test acc"] and row["Test acc"].endswith("%")
        assert row["Context length"] == "longest train ex. (120)"
    assert {(r["Trainable layers"], r["Trainable token"]) for r in rows} == {
        ("last_layer", "last"), ("last_layer", "flexible"),
        ("last_block", "last"), ("last_block", "flexible"),
    }
    for i, row in enumerate(rows):  # intervals over messages and seeds; verdicts against row 1
        low, high = (float(x) for x in row["Test acc 95% CI"].strip("[]").split(", "))
        assert low <= float(row["Test acc"].split(" ")[0]) <= high
        assert row["vs row 1"] == "baseline" if i == 0 else re.match(
            r"(within noise|better|worse) \([+-]\d+\.\d\d points \[95% CI [+-]", row["vs row 1"])
    md = (sweep / "summary.md").read_text()
    assert md.count("\n| ") == 5  # a separator and 4 rows after the header
    for col in ("Model", "Weights", "Trainable token", "Trainable layers", "Context length",
                "Training acc", "Validation acc", "Test acc", "Training time", "Device"):
        assert col in md

    # a crashed job shows as a failed row; the summary itself does not fail
    (sweep / "0" / "metrics.json").unlink()
    table = summarize(sweep)
    assert len(table) == 4
    failed = table[table["Status"] != "ok"]
    assert len(failed) == 1 and failed.iloc[0]["Status"] == "failed (1/2)"
    assert failed.iloc[0]["Seeds"] == 1 and "±" not in failed.iloc[0]["Test acc"]

    # on demand, from the command line
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "summarize.py"), str(sweep)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "failed (1/2)" in proc.stdout


def test_book_reference_only_beside_the_books_mean(tmp_path):
    # row 19's 96.33 % is the book's token=mean; a masked_mean run of that row gets no reference
    for i, token in enumerate(("mean", "masked_mean")):
        job = tmp_path / str(i)
        (job / ".hydra").mkdir(parents=True)
        config = {"token": {"name": token}, "reference": {"row": "19", "test_acc": 96.33}}
        (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
        (job / ".hydra" / "overrides.yaml").write_text(
            yaml.safe_dump(["experiment=table/row19", f"token={token}"])
        )
        (job / "metrics.json").write_text(json.dumps({"token": token, "test_accuracy": 0.95}))
    table = summarize(tmp_path, write=False)
    got = dict(zip(table["Trainable token"], table["Reference test acc"], strict=True))
    assert got == {"mean": "96.33%", "masked_mean": "—"}


def test_glob_over_nested_experiments():
    from spam_lightning.train import expand_nested_globs

    (arg,) = expand_nested_globs(["experiment=glob(table/*)"])
    assert arg == "experiment=" + ",".join(f"table/row{i:02d}" for i in range(1, 20))
    (arg,) = expand_nested_globs(["experiment=glob([table/row0*,fast],exclude=table/row05)"])
    assert arg.split("=")[1].split(",") == ["fast"] + [
        f"table/row{i:02d}" for i in range(1, 10) if i != 5
    ]
    assert expand_nested_globs(["seed=1,2", "trainable=glob(*)"]) == ["seed=1,2", "trainable=all,last_block,last_layer,last_two_blocks,lora"]
    with pytest.raises(SystemExit, match="no config"):
        expand_nested_globs(["experiment=glob(nothing*)"])
