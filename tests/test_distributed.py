"""2-process CPU DDP (gloo) through `python train.py trainer=ddp`: every example counted once (issue 8).

One real run of the tiny model with the bucketing sampler and the frozen-trunk cache. A probe
callback (this module, imported by both ranks through PYTHONPATH) records what each rank's train
loader yields, so the test can check that Lightning kept our batch sampler and sharded it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pandas as pd
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


class BatchProbe(L.Callback):
    """Writes ``rank<N>.json``: the train loader's samplers, each batch's indices and lengths."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.record: dict[str, Any] = {"batches": []}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        sampler = trainer.train_dataloader.batch_sampler
        self.record["batch_sampler"] = type(sampler).__name__
        self.record["sampler"] = type(sampler.sampler).__name__
        self.record["world_size"] = trainer.world_size

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        cache = pl_module.trunk_cache
        self.record["batches"].append(
            {
                "index": batch["index"].tolist(),
                "lengths": batch["lengths"].tolist(),
                "width": int(batch["input_ids"].shape[1]),
                "cached": cache is not None and cache.has("train"),
            }
        )

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"rank{trainer.global_rank}.json"
        path.write_text(json.dumps(self.record))


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, sms_file) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("ddp")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]
        ),
    }
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "train.py"),
            "trainer=ddp",
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            "model=gpt2-tiny",
            "data.padding=batch",
            "data.bucketing=true",
            "token=flexible",
            "cache.trunk=true",
            "optimizer.lr=1e-3",
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=4",
            "eval_freq=100",
            "eval_iter=1",
            "logger=none",
            "trainer.enable_progress_bar=false",
            "trainer.enable_model_summary=false",
            f"data.source={sms_file}",
            f"paths.data_dir={work / 'data'}",
            f"hydra.run.dir={work / 'run'}",
            "+callbacks.probe._target_=test_distributed.BatchProbe",
            f"+callbacks.probe.out_dir={work / 'probe'}",
        ],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"STDOUT\n{proc.stdout[-3000:]}\nSTDERR\n{proc.stderr[-6000:]}"
    return {"work": work, "proc": proc}


def test_ddp_counts_every_example_once(ddp_run) -> None:
    run = ddp_run["work"] / "run"
    m = json.loads((run / "metrics.json").read_text())
    # 149 and 1,045 are odd: the distributed sampler pads rank 1 with a repeat, which must not count
    assert (m["train_count"], m["val_count"], m["test_count"]) == (1045, 149, 300)
    assert m["device"] == "cpu x2" and m["trunk_cache"] is True
    # one run folder: rank 1 logs into it, and writes no second config or metrics
    assert (run / "train_ddp_process_1.log").is_file()
    assert sorted(p.name for p in ddp_run["work"].iterdir()) == ["data", "probe", "run"]


def test_ddp_metrics_equal_a_single_process_evaluation(ddp_run) -> None:
    """The bundle's weights, evaluated in this process on each full split, give the same numbers."""
    from spam_lightning.classify import Classifier

    work = ddp_run["work"]
    m = json.loads((work / "run" / "metrics.json").read_text())
    clf = Classifier(work / "run")
    for split, fname in (("val", "validation.csv"), ("test", "test.csv")):
        frame = pd.read_csv(work / "data" / "sms_spam" / fname)
        probs = clf.predict_proba(frame["Text"].tolist())
        labels = torch.tensor(frame["Label"].tolist())
        accuracy = (probs.argmax(-1) == labels).float().mean().item()
        loss = torch.nn.functional.nll_loss(probs.clamp_min(1e-12).log(), labels).item()
        assert m[f"{split}_accuracy"] == pytest.approx(accuracy, abs=1e-6), split
        assert m[f"{split}_loss"] == pytest.approx(loss, abs=1e-4), split


def test_ddp_bucketing_sampler_is_sharded_and_trunk_cache_used(ddp_run) -> None:
    probe = ddp_run["work"] / "probe"
    ranks = [json.loads((probe / f"rank{r}.json").read_text()) for r in (0, 1)]
    seen = []
    for rec in ranks:
        # Lightning re-created our LengthGroupedSampler around a DistributedSampler
        assert rec["batch_sampler"] == "LengthGroupedSampler", rec
        assert rec["sampler"] == "DistributedSampler" and rec["world_size"] == 2
        assert len(rec["batches"]) == 4
        for batch in rec["batches"]:
            assert batch["cached"]  # the frozen trunk came from the cache
            assert batch["lengths"] == sorted(batch["lengths"], reverse=True)  # length-grouped
            assert batch["width"] == max(batch["lengths"])  # padded to the batch's longest
        seen.append({i for b in rec["batches"] for i in b["index"]})
    assert len(seen[0]) == len(seen[1]) == 32
    assert not seen[0] & seen[1]  # the two ranks train on different examples
