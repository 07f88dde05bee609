"""2-process CPU DDP (gloo) through `python train.py trainer=ddp`: every example counted once (issue 8).

One real multirun of the tiny model: two DDP jobs in one process (the case Lightning's launcher
gets wrong without ``spam_lightning.sweeps.hydra_ddp``), the first with the bucketing sampler, both with
the frozen-trunk cache. A probe callback (this module, imported by every rank through PYTHONPATH)
records what each rank's train loader yields, so the test can check that Lightning kept our batch
sampler and sharded it.
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
from _compose import compose_train
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import open_dict, read_write

from spam_lightning.sweeps.hydra_ddp import job_command

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
        cached = "features" in batch  # the frozen trunk's states instead of token ids
        self.record["batches"].append(
            {
                "index": batch["index"].tolist(),
                "lengths": batch["lengths"].tolist(),
                "width": int(batch["features" if cached else "input_ids"].shape[1]),
                "cached": cached,
            }
        )

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"rank{trainer.global_rank}.json"
        path.write_text(json.dumps(self.record))


JOBS = ("0", "1")  # data.bucketing=true, data.bucketing=false


@pytest.fixture(scope="module")
def ddp_sweep(tmp_path_factory, sms_file) -> Path:
    work = tmp_path_factory.mktemp("ddp")
    tests = str(Path(__file__).parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])}
    args = [
        "-m",
        "data.bucketing=true,false",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "model=gpt2-tiny",
        "data.padding=batch",
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
        f"hydra.sweep.dir={work / 'sweep'}",
        "+callbacks.probe._target_=test_distributed.BatchProbe",
        "+callbacks.probe.out_dir=${hydra:runtime.output_dir}/probe",
    ]
    proc = subprocess.run(
        [sys.executable, str(REPO / "train.py"), *args],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, f"STDOUT\n{proc.stdout[-3000:]}\nSTDERR\n{proc.stderr[-6000:]}"
    return work


@pytest.mark.slow  # a 2-rank DDP sweep: half a minute
@pytest.mark.parametrize("job", JOBS)
def test_ddp_counts_every_example_once(ddp_sweep: Path, job: str) -> None:
    run = ddp_sweep / "sweep" / job
    m = json.loads((run / "metrics.json").read_text())
    # 149 and 1,045 are odd: the distributed sampler pads rank 1 with a repeat, which must not count
    assert (m["train_count"], m["val_count"], m["test_count"]) == (1045, 149, 300)
    assert m["device"] == "cpu x2" and m["trunk_cache"] is True
    # rank 1 re-ran this job (not the sweep) into this job's folder
    assert (run / "train_ddp_process_1.log").is_file()
    # beside the data and the sweep only the shared frozen-trunk cache (cache.dir's default)
    assert sorted(p.name for p in ddp_sweep.iterdir()) == ["data", "outputs", "sweep"]
    assert [p.name for p in (ddp_sweep / "outputs").iterdir()] == ["trunk_cache"]
    assert sorted(p.name for p in (ddp_sweep / "sweep").iterdir() if p.is_dir()) == list(JOBS)


@pytest.mark.slow
@pytest.mark.parametrize("job", JOBS)
def test_ddp_metrics_equal_a_single_process_evaluation(ddp_sweep: Path, job: str) -> None:
    """The bundle's weights, evaluated in this process on each full split, give the same numbers."""
    from spam_lightning.inference.classify import Classifier

    run = ddp_sweep / "sweep" / job
    m = json.loads((run / "metrics.json").read_text())
    clf = Classifier(run, raw=True)  # the softmax the metrics saw, not the calibrated probabilities
    for split, fname in (("val", "validation.csv"), ("test", "test.csv")):
        frame = pd.read_csv(ddp_sweep / "data" / "sms_spam" / fname)
        probs = clf.predict_proba(frame["Text"].tolist())
        labels = torch.tensor(frame["Label"].tolist())
        accuracy = (probs.argmax(-1) == labels).float().mean().item()
        loss = torch.nn.functional.nll_loss(probs.clamp_min(1e-12).log(), labels).item()
        assert m[f"{split}_accuracy"] == pytest.approx(accuracy, abs=1e-6), split
        assert m[f"{split}_loss"] == pytest.approx(loss, abs=1e-4), split


@pytest.mark.slow
@pytest.mark.parametrize(
    ("job", "batch_sampler"), [("0", "LengthGroupedSampler"), ("1", "BatchSampler")]
)
def test_ddp_train_loader_is_sharded_and_trunk_cache_used(
    ddp_sweep: Path, job: str, batch_sampler: str
) -> None:
    probe = ddp_sweep / "sweep" / job / "probe"
    ranks = [json.loads((probe / f"rank{r}.json").read_text()) for r in (0, 1)]
    seen = []
    for rec in ranks:
        # Lightning re-created our batch sampler around a DistributedSampler
        assert rec["batch_sampler"] == batch_sampler, rec
        assert rec["sampler"] == "DistributedSampler" and rec["world_size"] == 2
        assert len(rec["batches"]) == 4
        for batch in rec["batches"]:
            assert batch["cached"]  # the frozen trunk came from the cache
            assert batch["width"] == max(batch["lengths"])  # padded to the batch's longest
            if batch_sampler == "LengthGroupedSampler":
                assert batch["lengths"] == sorted(batch["lengths"], reverse=True)
        seen.append({i for b in rec["batches"] for i in b["index"]})
    assert len(seen[0]) == len(seen[1]) == 32
    assert not seen[0] & seen[1]  # the two ranks train on different examples


# ------------------------------------------------------------------ the children's command


def _value(command: list[str], key: str) -> str:
    item = next(c for c in command if c.startswith(f"{key}="))
    return OverridesParser.create().parse_overrides([item])[0].value()


def test_single_run_children_get_the_resolved_run_dir(tmp_path: Path) -> None:
    cfg = compose_train(["trainer=ddp", "seed=7"], tmp_path)
    command, _ = job_command(1)  # RUN mode: Lightning's own command
    run_dir = _value(command, "hydra.run.dir")
    assert "${" not in run_dir and "/outputs/runs/" in run_dir  # ${now:...} already resolved
    assert run_dir == str(cfg.hydra.run.dir)
    assert "hydra.output_subdir=null" in command


def test_multirun_children_rerun_only_their_job(tmp_path: Path) -> None:
    cfg = compose_train(["trainer=ddp", "seed=7", "hparams_search=optuna"], tmp_path)
    job_dir = str(tmp_path / "it's a sweep" / "3")
    with read_write(cfg.hydra), open_dict(cfg.hydra):
        cfg.hydra.mode = "MULTIRUN"
        cfg.hydra.runtime.output_dir = job_dir
    HydraConfig.instance().set_config(cfg)
    command, cwd = job_command(1)
    assert command[:3] == [sys.executable, "-m", "spam_lightning.train"]
    assert "--config-name=train" in command and "-m" not in command[3:]
    assert {"trainer=ddp", "seed=7", "hparams_search=optuna"} <= set(command)
    assert _value(command, "hydra.run.dir") == job_dir  # quoted: spaces and quotes survive
    assert command[-1] == "hydra.mode=RUN" and cwd == cfg.hydra.runtime.cwd


def test_fsdp_config_builds_a_strategy_that_wraps_each_block(tmp_path: Path) -> None:
    """FSDP needs GPUs to run; here only its config is checked (it must instantiate)."""
    from hydra.utils import instantiate
    from lightning.pytorch.strategies import FSDPStrategy

    from spam_lightning.model.gpt import TransformerBlock

    cfg = compose_train(["trainer=fsdp"], tmp_path)
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, FSDPStrategy)
    assert strategy.kwargs["auto_wrap_policy"]._module_classes == {TransformerBlock}
