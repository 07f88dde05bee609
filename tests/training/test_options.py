"""Issue 26: the training options users of Lightning and Hugging Face expect, each off by default
(the chapter's printout is tests/test_book_fidelity.py's): the optimizer group, learning-rate
schedules, early stopping with the best weights, class weights and unbalanced data, label
smoothing, gradient checkpointing; and one configuration error per bad value."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _compose import compose_train

from spam_lightning.model.gpt2 import build_model
from spam_lightning.training.callbacks import load_checkpoint_safely
from spam_lightning.training.module import TextClassifier, balanced_weights, training_options
from spam_lightning.training.schedules import Cosine, LinearWarmup

TINY = ["model=gpt2-tiny", "debug=limit", "logger=none"]


def _module(tmp_path: Path, *overrides: str, model: torch.nn.Module | None = None,
            num_classes: int = 2) -> TextClassifier:
    cfg = compose_train([*TINY, *overrides], tmp_path)
    return TextClassifier(model or torch.nn.Linear(4, num_classes), num_classes=num_classes,
                          **training_options(cfg))


# ------------------------------------------------------------------ 6. optimizer
@pytest.mark.parametrize(("overrides", "cls", "expected"), [
    ((), torch.optim.AdamW, {"lr": 5e-5, "weight_decay": 0.1, "fused": True}),  # the chapter's
    (("optimizer=sgd",), torch.optim.SGD, {"lr": 0.01, "momentum": 0.9, "weight_decay": 0.0}),
    (("optimizer._target_=torch.optim.RMSprop", "optimizer.lr=0.001"), torch.optim.RMSprop,
     {"lr": 0.001, "weight_decay": 0.1}),
    (("optimizer.lr=0.002", "optimizer.weight_decay=0.0"), torch.optim.AdamW,
     {"lr": 0.002, "weight_decay": 0.0, "fused": True}),
])
def test_optimizer_group_builds_any_torch_optim_class(overrides, cls, expected, tmp_path) -> None:
    optimizer = _module(tmp_path, *overrides).configure_optimizers()
    assert type(optimizer) is cls
    assert {k: optimizer.defaults[k] for k in expected} == expected


# ------------------------------------------------------------------ 2. schedules
def _lrs(schedule, total: int, lr: float = 0.1) -> list[float]:
    """The learning rate each of ``total`` optimizer steps uses (LambdaLR stepped after each)."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler, seen = schedule.build(optimizer, lambda: total), []
    for _ in range(total):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return seen


def test_schedules_follow_their_formulas() -> None:
    total, lr = 40, 0.1
    linear = _lrs(LinearWarmup(warmup_steps=10), total, lr)  # up over 10 steps, down to 0 at 40
    for step, want in ((0, 0.0), (5, 0.05), (10, 0.1), (25, 0.05), (39, 0.1 / 30)):
        assert linear[step] == pytest.approx(want, abs=1e-12), step
    fraction = _lrs(LinearWarmup(warmup_fraction=0.25), total, lr)  # ceil(0.25 * 40) = 10 steps
    assert fraction == pytest.approx(linear, abs=1e-15)
    cosine = _lrs(Cosine(warmup_steps=0), total, lr)
    for step in (0, 10, 20, 30, 39):
        assert cosine[step] == pytest.approx(lr * 0.5 * (1 + math.cos(math.pi * step / total)), abs=1e-12)
    warm = _lrs(Cosine(warmup_fraction=0.1), total, lr)  # 4 warmup steps, then the half cosine
    assert warm[2] == pytest.approx(0.05) and warm[4] == pytest.approx(lr)
    assert warm[22] == pytest.approx(lr * 0.5 * (1 + math.cos(math.pi * 18 / 36)))


def test_schedule_runs_per_step_and_is_logged(tiny_run) -> None:
    """A run: LearningRateMonitor logs every optimizer step's rate (logger=csv), the formula's."""
    _, metrics, run = tiny_run("trainer.max_epochs=2", "scheduler=linear_warmup",
                               "scheduler.warmup_steps=2", "logger=csv",
                               "trainer.log_every_n_steps=1")
    total = metrics["global_step"]
    assert total == 6  # debug=limit: 3 batches, 2 epochs
    rows = list(csv.DictReader((run / "csv" / "metrics.csv").open()))
    logged = {int(r["step"]): float(r["lr-AdamW"]) for r in rows if r.get("lr-AdamW")}
    want = [5e-5 * (s / 2 if s < 2 else (total - s) / (total - 2)) for s in range(total)]
    assert [logged[s] for s in range(total)] == pytest.approx(want, abs=1e-15)


@pytest.mark.slow  # two runs of 3 epochs and a resume
def test_resume_with_a_schedule_is_exact(tiny_run, monkeypatch) -> None:
    """Interrupted mid-epoch (Ctrl-C, the step saved) and resumed: the same history, learning
    rates and weights as the uninterrupted run."""
    import os
    import signal

    from spam_lightning.train import TrainingInterrupted

    options = ("trainer.max_epochs=3", "scheduler=cosine", "scheduler.warmup_steps=3",
               "model.drop_rate=0.1")
    step = TextClassifier.training_step

    def interrupt(self, batch, batch_idx):
        if self.global_step == 4:  # mid epoch 2
            os.kill(os.getpid(), signal.SIGINT)
        return step(self, batch, batch_idx)

    monkeypatch.setattr(TextClassifier, "training_step", interrupt)
    with pytest.raises(TrainingInterrupted):
        tiny_run(*options)
    monkeypatch.setattr(TextClassifier, "training_step", step)
    _, resumed, run = tiny_run(*options, "ckpt_path=last")  # in the interrupted run's folder
    _, whole, whole_run = tiny_run(*options)
    assert run != whole_run
    for key in ("train_loss", "val_loss", "test_loss", "test_accuracy", "global_step"):
        assert resumed[key] == whole[key], key
    assert (json.loads((run / "history.json").read_text())
            == json.loads((whole_run / "history.json").read_text()))
    a, b = (load_checkpoint_safely(r / "checkpoints" / "last.ckpt") for r in (run, whole_run))
    assert a["lr_schedulers"] == b["lr_schedulers"]
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in b["state_dict"])


# ------------------------------------------------------------------ 1. early stopping
def test_early_stopping_stops_on_a_plateau_and_final_weights_best(tiny_run) -> None:
    """min_delta 10: val/loss never improves by that much, so patience 1 stops after epoch 2 of
    5; the final evaluation and the bundle use the best checkpoint's (val/acc) weights."""
    from safetensors.torch import load_file

    cfg, metrics, run = tiny_run(
        "trainer.max_epochs=5", "optimizer.lr=1e-3", "callbacks=early_stopping",
        "callbacks.early_stopping.patience=1", "callbacks.early_stopping.min_delta=10",
        "final_weights=best")
    assert metrics["epochs"] == 2 < cfg.trainer.max_epochs
    assert metrics["global_step"] == 6
    (best_file,) = (run / "checkpoints").glob("epoch*.ckpt")
    assert best_file.name == "epoch00.ckpt"  # the best validation accuracy: epoch 1's
    best = load_checkpoint_safely(best_file)["state_dict"]
    last = load_checkpoint_safely(run / "checkpoints" / "last.ckpt")["state_dict"]
    bundle = load_file(run / "bundle" / "model.safetensors")
    head = "out_head.weight"
    assert not torch.equal(best[f"model.{head}"], last[f"model.{head}"])
    assert torch.equal(bundle[head], best[f"model.{head}"])


# ------------------------------------------------------------------ 3, 4. loss options
def _batch_loss(module: TextClassifier, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    module.batch_logits = lambda batch: logits  # the known batch's logits
    return module.batch_loss({"labels": labels})[0]


def test_class_weights_scale_each_example_loss(tmp_path) -> None:
    torch.manual_seed(0)
    logits, labels = torch.randn(6, 2), torch.tensor([0, 0, 0, 0, 1, 1])
    plain = F.cross_entropy(logits, labels, reduction="none")
    weighted = _batch_loss(_module(tmp_path, "loss.class_weights=[1.0,3.0]"), logits, labels)
    w = torch.tensor([1.0, 3.0])[labels]  # each example's loss times its class's weight
    assert weighted == pytest.approx(float((w * plain).sum() / w.sum()), abs=1e-7)
    assert _batch_loss(_module(tmp_path), logits, labels) == pytest.approx(float(plain.mean()), abs=1e-7)
    # all one class: the weighted mean is that class's plain mean, whatever its weight
    ones = torch.ones(6, dtype=torch.long)
    assert _batch_loss(_module(tmp_path, "loss.class_weights=[1.0,3.0]"), logits, ones) == pytest.approx(
        float(F.cross_entropy(logits, ones)), abs=1e-7)
    assert balanced_weights([0, 0, 0, 1], 2) == [4 / 6, 4 / 2]  # n / (classes * n_c)


def test_label_smoothing_matches_torch(tmp_path) -> None:
    torch.manual_seed(0)
    logits, labels = torch.randn(8, 2), torch.randint(0, 2, (8,))
    got = _batch_loss(_module(tmp_path, "loss.label_smoothing=0.1"), logits, labels)
    assert torch.equal(got, F.cross_entropy(logits, labels, label_smoothing=0.1))
    assert not torch.equal(got, F.cross_entropy(logits, labels))


def test_unbalanced_sms_with_balanced_class_weights(tiny_run, sms_file, tmp_path, caplog) -> None:
    """data.balance=false keeps all 4,825 ham (recorded in meta.json: never reused for the
    balanced split); class_weights=balanced weighs spam up by the training counts; metrics.json
    has each class's recall."""
    import logging

    from spam_lightning.data.table import prepare

    meta = prepare(str(sms_file), tmp_path / "all", balance=False).meta
    counts = meta["splits"]
    assert sum(c["ham"] for c in counts.values()) == 4825
    assert sum(c["spam"] for c in counts.values()) == 747
    assert meta["settings"]["balance"] is False
    assert "balance" not in prepare(str(sms_file), tmp_path / "chapter").meta["settings"]
    train = counts["train"]
    weights = [train["rows"] / (2 * train[c]) for c in ("ham", "spam")]
    with caplog.at_level(logging.INFO, logger="spam_lightning.training.module"):
        _, metrics, run = tiny_run("data.balance=false", "loss.class_weights=balanced",
                                   f"data.data_dir={tmp_path / 'all'}")
    assert f"loss.class_weights=balanced: ham {weights[0]:.4g}, spam {weights[1]:.4g}" in caplog.text
    assert weights[1] > 3 * weights[0]
    for split in ("train", "val", "test"):
        recall = metrics[f"{split}_recall_per_class"]
        assert set(recall) == {"ham", "spam"} and recall["spam"] == metrics[f"{split}_recall"]
    assert json.loads((run / "metrics.json").read_text())["test_recall_per_class"] == \
        metrics["test_recall_per_class"]


# ------------------------------------------------------------------ 5. gradient checkpointing
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tmp_path) -> None:
    """trainable=all with dropout: checkpointed blocks replay the same dropout masks."""
    results = []
    for flag in (False, True):
        cfg = compose_train([*TINY, "trainable=all", "model.drop_rate=0.1",
                             f"model.gradient_checkpointing={str(flag).lower()}"], tmp_path)
        model = build_model(cfg, 2).train()
        assert model.gradient_checkpointing is flag
        torch.manual_seed(1)
        ids = torch.randint(0, 50257, (4, 12))
        loss = F.cross_entropy(model(ids, torch.full((4,), 12)), torch.tensor([0, 1, 0, 1]))
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (plain, grads), (checkpointed, cgrads) = results
    assert torch.equal(plain, checkpointed)
    assert all(torch.equal(grads[n], cgrads[n]) for n in grads)


# ------------------------------------------------------------------ bad values, the summary
BAD = {
    "scheduler.warmup_fraction=1.5": "scheduler.warmup_fraction=1.5: must be a number in [0, 1]",
    "scheduler.warmup_steps=-2": "scheduler.warmup_steps=-2: must be an integer >= 0",
    "loss.label_smoothing=-0.1": "loss.label_smoothing=-0.1: must be a number in [0, 1)",
    "loss.class_weights=[1.0,2.0,3.0]": "loss.class_weights=[1.0, 2.0, 3.0]: 3 weights, but the data "
                                        "has 2 classes",
    "final_weights=first": "final_weights='first' is unknown; allowed: last, best",
    "callbacks.early_stopping.monitor=val/accuracy": "callbacks.early_stopping.monitor="
        "'val/accuracy' is not logged; allowed: val/loss, val/acc, val/precision, val/recall, val/f1",
    "callbacks.early_stopping.patience=0": "callbacks.early_stopping.patience=0: must be an integer >= 1",
    "optimizer._target_=torch.optim.Nope": "optimizer._target_=torch.optim.Nope: not a "
                                           "torch.optim.Optimizer class",
    "model.gradient_checkpointing=maybe": "model.gradient_checkpointing='maybe': must be true or false",
}


def test_each_bad_option_is_one_line_of_one_config_error(tmp_path, sms_file, monkeypatch) -> None:
    """Every bad value above in one run: one ConfigError naming each option and what is allowed,
    before any model is built (and with no traceback: train.py prints it as `Error: ...`)."""
    from spam_lightning.train import train
    from spam_lightning.training.checks import ConfigError

    def boom(*args, **kwargs):
        raise AssertionError("the model was built before the configuration error")

    monkeypatch.setattr("spam_lightning.model.gpt2.build_gpt", boom)
    cfg = compose_train([*TINY, f"data.source={sms_file}", "scheduler=linear_warmup",
                         "callbacks=early_stopping", *BAD], tmp_path)
    with pytest.raises(ConfigError) as err:
        train(cfg)
    text = str(err.value)
    assert text.startswith("Invalid configuration:")
    for message in BAD.values():
        assert message in text
    assert not (tmp_path / "data").exists()
    cfg = compose_train([*TINY, "final_weights=best", "callbacks=none", "loss.class_weights=heavy",
                         "data.balance=maybe"], tmp_path)
    with pytest.raises(ConfigError) as err:
        train(cfg)
    assert "final_weights=best needs a checkpoint callback" in str(err.value)
    assert "loss.class_weights='heavy': must be null, balanced, or a list" in str(err.value)
    assert "data.balance='maybe': must be true or false" in str(err.value)


def test_sweep_summary_shows_each_class_recall(tmp_path) -> None:
    from spam_lightning.sweeps.summary import summarize

    for job, spam in enumerate((0.9, 0.8)):
        folder = tmp_path / str(job)
        (folder / ".hydra").mkdir(parents=True)
        (folder / ".hydra" / "overrides.yaml").write_text(f"- seed={job}\n")
        (folder / "metrics.json").write_text(json.dumps(
            {"test_accuracy": 0.9, "test_recall_per_class": {"ham": 1.0, "spam": spam}}))
    table = summarize(tmp_path, write=False)
    assert table.iloc[0]["Test recall per class"] == "ham 100.00 ± 0.00%, spam 85.00 ± 7.07%"
