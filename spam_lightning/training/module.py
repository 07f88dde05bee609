"""The LightningModule: chapter 6.6-6.7 (loss on the class logits, AdamW, accuracy) around the model
family's classifier. The final ``trainer.test`` leaves its results in ``test_results``. The training
options (``optimizer``, ``scheduler``, ``loss.*``, ``final_weights``) arrive as plain values from
``training_options(cfg)``; each default is the chapter's."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

from spam_lightning.model.base import describe, digest, frozen_keys

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
FINAL_WEIGHTS = ("last", "best")
# the optimizers whose fused kernels do the same arithmetic (~1e-8 after 50 steps), ~3x faster on CPU
FUSED = (torch.optim.AdamW, torch.optim.Adam)


def training_options(cfg: Any) -> dict[str, Any]:
    """``TextClassifier``'s options from a run's config: the ``optimizer`` node (``_target_``,
    ``_partial_``, its arguments), the ``scheduler`` node, the loss's options and ``final_weights``,
    as plain values (they are hyperparameters: checkpoints and loggers keep them)."""
    from omegaconf import OmegaConf

    def plain(node: Any) -> Any:
        return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node

    optimizer, loss = plain(cfg.optimizer), cfg.get("loss") or {}
    return {"lr": optimizer.get("lr"), "weight_decay": optimizer.get("weight_decay", 0.0),
            "optimizer": optimizer, "scheduler": plain(cfg.get("scheduler")),
            "ignore_index": loss.get("ignore_index", -100),
            "class_weights": plain(loss.get("class_weights")),
            "label_smoothing": float(loss.get("label_smoothing", 0.0)),
            "final_weights": cfg.get("final_weights", "last")}


def balanced_weights(labels: list[int] | torch.Tensor, num_classes: int) -> list[float]:
    """``loss.class_weights=balanced``: ``n / (num_classes * n_c)`` per class (scikit-learn's
    ``compute_class_weight("balanced")``) from the training labels; a class without training
    examples gets weight 1 (no example ever multiplies it)."""
    counts = torch.bincount(torch.as_tensor(labels, dtype=torch.long), minlength=num_classes)
    total = int(counts.sum())
    return [total / (num_classes * int(c)) if c else 1.0 for c in counts.tolist()]


def make_metrics(num_classes: int) -> MetricCollection:
    """Accuracy, plus precision/recall/F1 of the positive class (binary) or macro (multi-class)."""
    # binary: average=None, then `_positive` picks class 1 ("spam")
    kw = {"num_classes": num_classes, "average": None if num_classes == 2 else "macro"}
    return MetricCollection({
        "accuracy": MulticlassAccuracy(num_classes=num_classes, average="micro"),
        "precision": MulticlassPrecision(**kw), "recall": MulticlassRecall(**kw), "f1": MulticlassF1Score(**kw),
    })


def _positive(value: torch.Tensor) -> torch.Tensor:
    """Reduce a per-class metric to the positive class; leave scalars alone."""
    return value[1] if value.ndim == 1 else value


def split_metrics(
    probs: torch.Tensor, labels: torch.Tensor, num_classes: int,
    losses: torch.Tensor | None = None, ignore_index: int = -100,
    class_names: list[str] | None = None,
) -> dict[str, Any]:
    """One whole split's final metrics from its class probabilities: accuracy, precision,
    recall, F1, the mean cross-entropy (``losses`` per example, else ``-log p[label]``) and the
    example count; with ``class_names`` also ``recall_per_class`` (``{name: recall}``). The
    inputs are already gathered: no distributed sync."""
    metrics = make_metrics(num_classes).to(probs.device)
    for m in (metrics, *metrics.values()):
        m.sync_on_compute = False
    values: dict[str, Any] = {k: float(_positive(v)) for k, v in metrics(probs, labels).items()}
    if class_names is not None:  # each class's share of its examples predicted as it
        recall = MulticlassRecall(num_classes=num_classes, average=None).to(probs.device)
        recall.sync_on_compute = False
        values["recall_per_class"] = {str(n): float(r) for n, r in
                                      zip(class_names, recall(probs, labels), strict=True)}
    counted = labels != ignore_index
    if losses is None:
        picked = probs[counted].gather(1, labels[counted, None]).squeeze(1)
        losses = -picked.clamp_min(1e-12).log()
        counted = torch.ones_like(losses, dtype=torch.bool)
    values["loss"] = float(losses[counted].mean()) if counted.any() else 0.0
    values["count"] = float(len(labels))
    return values


@dataclass
class TestResults:
    """The final test loop's result. ``metrics``: ``{split}_{accuracy,loss,precision,recall,f1,count}``
    and ``{split}_recall_per_class`` (``{class name: recall}``);
    ``outputs``: per split (test dataloader order), every example once, sorted by index: CPU tensors
    ``index``, ``labels``, ``probs`` and ``losses``."""

    class_names: list[str]
    metrics: dict[str, float] = field(default_factory=dict)
    outputs: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


class TextClassifier(L.LightningModule):
    """Trains any text classifier ``model(input_ids, lengths) -> logits`` (for a cached frozen
    trunk, ``model(features, lengths, start_block)``): the loss, the optimizer and the metrics,
    nothing about data or configuration. The test dataloaders are ``final_splits``, in order.

    ``optimizer``: a ``_target_`` + ``_partial_`` node (None: the chapter's AdamW with ``lr`` and
    ``weight_decay``); ``scheduler``: a ``schedules.py`` node (None: constant); ``class_weights``:
    None, ``balanced`` (from the training labels, at fit start) or one weight per class;
    ``label_smoothing``; ``final_weights``: ``best`` loads the best checkpoint's weights at the end
    of fitting (the final evaluation and the bundle use them)."""

    def __init__(
        self, model: nn.Module, *, num_classes: int = 2, trainable: str = "last_block", lr: float = 5e-5,
        weight_decay: float = 0.1, ignore_index: int = -100, class_names: list[str] | None = None,
        final_splits: tuple[str, ...] = ("test",), base: dict | None = None,
        optimizer: dict[str, Any] | None = None, scheduler: dict[str, Any] | None = None,
        class_weights: str | list[float] | None = None, label_smoothing: float = 0.0,
        final_weights: str = "last",
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model", "final_splits", "base"])
        self.base, self._base_sha256 = base, None  # the frozen base's identity (model/base.py)
        self.model = model
        self.num_classes = num_classes
        if isinstance(class_weights, list | tuple) and len(class_weights) != num_classes:
            from spam_lightning.training.checks import ConfigError

            raise ConfigError(f"loss.class_weights={list(class_weights)}: {len(class_weights)} weights, "
                              f"but the data has {num_classes} classes ({', '.join(map(str, class_names or []))}); "
                              "give one weight per class, or balanced, or null")
        weight = torch.tensor(class_weights, dtype=torch.float32) if isinstance(class_weights, list | tuple) else None
        self.loss_fn = nn.CrossEntropyLoss(weight=weight, ignore_index=ignore_index,
                                           label_smoothing=float(label_smoothing))
        # a setting, not a state: kept out of checkpoints (which the chapter's runs share)
        self.loss_fn.register_buffer("weight", weight, persistent=False)
        # ModuleDict keys may not shadow nn.Module attributes such as `train`: suffix them
        self.metrics = nn.ModuleDict({f"{s}_split": make_metrics(num_classes) for s in SPLITS})
        self.final_splits = tuple(final_splits)
        self.test_results: TestResults | None = None
        self._outputs: dict[str, list[dict[str, torch.Tensor]]] = {}

    def forward(self, x: torch.Tensor, lengths=None, start_block: int | None = None) -> torch.Tensor:
        """Token ids, or from ``start_block`` the frozen trunk's features (``trunk_cache.py``)."""
        return self.model(x, lengths) if start_block is None else self.model(x, lengths, start_block)

    def batch_logits(self, batch: dict) -> torch.Tensor:
        if "features" in batch:
            return self(batch["features"], batch["lengths"], batch["start_block"])
        return self(batch["input_ids"], batch["lengths"])

    def batch_loss(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.batch_logits(batch)
        return self.loss_fn(logits.float(), batch["labels"]), logits

    def setup(self, stage: str) -> None:
        """``loss.class_weights=balanced``: the weights from the training labels, once known."""
        if stage == "fit" and self.hparams.get("class_weights") == "balanced" and self.loss_fn.weight is None:
            labels = self.trainer.datamodule.token_dataset("train").labels
            weights = balanced_weights(labels, self.num_classes)
            log.info("loss.class_weights=balanced: %s", ", ".join(
                f"{n} {w:.4g}" for n, w in zip(self.hparams.get("class_names") or range(self.num_classes),
                                               weights, strict=True)))
            self.loss_fn.weight = torch.tensor(weights, dtype=torch.float32, device=self.device)

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, logits = self.batch_loss(batch)
        self.metrics["train_split"].update(logits.detach().float(), batch["labels"])
        self.log("train/loss", loss, on_step=True, on_epoch=True, batch_size=len(batch["labels"]), prog_bar=True)
        return loss

    def on_train_epoch_end(self) -> None:
        self._log_metrics(self.metrics["train_split"], "train")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss, logits = self.batch_loss(batch)
        self.metrics["val_split"].update(logits.float(), batch["labels"])
        self.log("val/loss", loss, on_epoch=True, batch_size=len(batch["labels"]), prog_bar=True, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        self._log_metrics(self.metrics["val_split"], "val", prog_bar=True)

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Keep per-example results: the final metrics count every example exactly once."""
        split = self.final_splits[dataloader_idx]
        logits = self.batch_logits(batch).float()
        losses = F.cross_entropy(logits, batch["labels"], ignore_index=self.loss_fn.ignore_index, reduction="none")
        self._outputs.setdefault(split, []).append({"index": batch["index"], "labels": batch["labels"],
                                                    "probs": torch.softmax(logits, dim=-1), "losses": losses})

    def on_test_epoch_start(self) -> None:
        self._outputs: dict[str, list[dict[str, torch.Tensor]]] = {}

    def _gather_split(self, split: str) -> dict[str, torch.Tensor]:
        """All ranks' outputs for one split, de-duplicated by example index (a distributed
        sampler pads the last rank with repeats): every example counts once at any world size."""
        parts = self._outputs.get(split, [])
        local = {k: torch.cat([p[k] for p in parts]) if parts else torch.empty(0, device=self.device)
                 for k in ("index", "labels", "probs", "losses")}
        if self.trainer is not None and self.trainer.world_size > 1:
            gathered = self.all_gather(local)
            local = {k: v.flatten(0, 1) for k, v in gathered.items()}
        order = torch.argsort(local["index"], stable=True)
        local = {k: v[order] for k, v in local.items()}
        keep = torch.ones_like(local["index"], dtype=torch.bool)
        keep[1:] = local["index"][1:] != local["index"][:-1]
        return {k: v[keep] for k, v in local.items()}

    def on_test_epoch_end(self) -> None:
        names = self.hparams.get("class_names") or range(self.num_classes)
        self.test_results = TestResults([str(n) for n in names])
        results = self.test_results.metrics
        for split in self.final_splits:
            out = self._gather_split(split)
            self.test_results.outputs[split] = {k: v.cpu() for k, v in out.items()}
            values = split_metrics(  # gathered already: each rank holds the split
                out["probs"], out["labels"], self.num_classes, out["losses"], self.loss_fn.ignore_index,
                self.test_results.class_names)
            results.update({f"{split}_{name}": value for name, value in values.items()})
        for key, value in results.items():
            if not key.endswith(("_count", "_per_class")):
                self.log(f"final/{key}", value, add_dataloader_idx=False, rank_zero_only=True)

    def _log_metrics(self, metrics: MetricCollection, split: str, prog_bar: bool = False) -> None:
        for name, value in metrics.compute().items():
            short = "acc" if name == "accuracy" else name
            self.log(f"{split}/{short}", _positive(value), prog_bar=prog_bar and name == "accuracy")
        metrics.reset()

    # ------------------------------------------------------------------ checkpoints
    def base_sha256(self) -> str:
        """The frozen parameters' digest; computed once (they never change)."""
        if self._base_sha256 is None:
            self._base_sha256 = digest(self.state_dict(), frozen_keys(self))
        return self._base_sha256

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep what trains: the frozen parameters are left out, named by the base's identity,
        their shapes and digest. Sharded strategies (FSDP) keep Lightning's full checkpoint."""
        from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

        state, frozen = checkpoint["state_dict"], frozen_keys(self)
        strategy = self._trainer.strategy if self._trainer is not None else None
        if not frozen or not isinstance(strategy, SingleDeviceStrategy | DDPStrategy) or not set(frozen) <= state.keys():
            return
        checkpoint["frozen_base"] = {"identity": self.base, "sha256": self.base_sha256(),
                                     "shapes": {k: list(state[k].shape) for k in frozen}}
        for key in frozen:
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Put this run's frozen parameters back into a checkpoint that left them out, after
        checking they are the ones it trained on (a changed Hub file, seed or local file is refused)."""
        if (base := checkpoint.get("frozen_base")) is None:  # a full checkpoint: nothing left out
            return
        if (found := self.base_sha256()) != base["sha256"]:
            from spam_lightning.model.weights import CheckpointError

            raise CheckpointError(
                f"ckpt_path={self._trainer.ckpt_path if self._trainer else ''}: it was trained on {describe(base.get('identity'))}, whose frozen weights have "
                f"sha256 {base['sha256'][:16]}…, but this run's model has {found[:16]}…; resume with the "
                "model.* and seed settings (and weights file) the checkpoint was trained with, or start a new run")
        own = self.state_dict()
        checkpoint["state_dict"].update({k: own[k] for k in base["shapes"]})

    def on_fit_end(self) -> None:
        """``final_weights=best``: the best checkpoint's weights (its frozen ones refilled by
        ``on_load_checkpoint``) replace the last epoch's, for the final evaluation and the bundle."""
        if self.hparams.get("final_weights", "last") != "best":
            return
        from spam_lightning.training.callbacks.checkpoint_io import load_checkpoint_safely

        best = next((cb for cb in self.trainer.checkpoint_callbacks if cb.monitor is not None), None)
        path = best.best_model_path if best is not None else ""
        if not path:
            log.warning("final_weights=best: no best checkpoint was written (no validation ran?); "
                        "the final evaluation uses the last weights")
            return
        checkpoint = load_checkpoint_safely(path)
        self.on_load_checkpoint(checkpoint)
        self.load_state_dict(checkpoint["state_dict"])
        score = best.best_model_score
        log.info("final_weights=best: the final evaluation and the bundle use %s (%s %s)", path,
                 best.monitor, f"{float(score):.4f}" if score is not None else "?")

    # ------------------------------------------------------------------ optimizer
    def configure_optimizers(self) -> Any:
        """The ``optimizer`` node's class on the trainable parameters (the chapter's AdamW, fused
        where torch can: the same arithmetic (~1e-8 after 50 steps), ~3x faster on CPU, which
        matters once the cached trunk makes steps cheap), and the ``scheduler``, stepped after
        every optimizer step over ``trainer.estimated_stepping_batches``."""
        import hydra

        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("No trainable parameters: check the `trainable` option.")
        fused = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float64) for p in params)
        hp = self.hparams
        node = hp.get("optimizer") or {"_target_": "torch.optim.AdamW", "_partial_": True,
                                       "lr": hp.lr, "weight_decay": hp.weight_decay}
        make = hydra.utils.instantiate(node)
        extra = {"fused": fused or None} if make.func in FUSED and "fused" not in node else {}
        optimizer = make(params, **extra)
        schedule = hydra.utils.instantiate(hp.scheduler) if hp.get("scheduler") else None
        # the step count once training runs (asked now, it would fix the training loader before
        # the frozen-trunk cache replaces it)
        scheduler = schedule.build(optimizer, lambda: self.trainer.estimated_stepping_batches) if schedule else None
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def predict_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return F.softmax(self.batch_logits(batch).float(), dim=-1)
