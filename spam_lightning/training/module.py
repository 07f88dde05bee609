"""The LightningModule: chapter 6.6-6.7 (loss on one token position, AdamW, accuracy)."""

from __future__ import annotations

import logging
import math

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

from spam_lightning.model.classifier import first_trainable_block, pool_logits
from spam_lightning.model.gpt import TransformerBlock
from spam_lightning.model.trunk_cache import TrunkCache, TrunkCacheError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


def make_metrics(num_classes: int) -> MetricCollection:
    """Accuracy, plus precision/recall/F1 of the positive class (binary) or macro (multi-class)."""
    if num_classes == 2:
        # positive class = index 1 ("spam"): average=None then pick class 1
        kw = {"num_classes": 2, "average": None}
        per_class = {
            "precision": MulticlassPrecision(**kw),
            "recall": MulticlassRecall(**kw),
            "f1": MulticlassF1Score(**kw),
        }
    else:
        kw = {"num_classes": num_classes, "average": "macro"}
        per_class = {
            "precision": MulticlassPrecision(**kw),
            "recall": MulticlassRecall(**kw),
            "f1": MulticlassF1Score(**kw),
        }
    return MetricCollection(
        {"accuracy": MulticlassAccuracy(num_classes=num_classes, average="micro"), **per_class}
    )


def _dataset(datamodule, split: str):
    """The tokenized dataset of a split (``train|val|test``) of a prepared datamodule."""
    return getattr(datamodule, f"{split}_dataset")


def _split_names(splits: list[str]) -> str:
    return ", ".join(splits[:-1]) + f" and {splits[-1]}" if len(splits) > 1 else "".join(splits)


def _positive(value: torch.Tensor) -> torch.Tensor:
    """Reduce a per-class metric to the positive class; leave scalars alone."""
    return value[1] if value.ndim == 1 else value


class SpamClassifier(L.LightningModule):
    """GPT-2 with a class head, trained on the logits of one token position.

    ``model`` is a GPTModel already turned into a classifier (see
    ``classifier.make_classifier``); this module owns the loss, the optimizer, the metrics and
    the optional frozen-trunk cache, nothing about data or configuration.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        num_classes: int = 2,
        token: str = "last",
        trainable: str = "last_block",
        lr: float = 5e-5,
        weight_decay: float = 0.1,
        ignore_index: int = -100,
        cache_trunk: str | bool = "auto",
        cache_memory_budget_gb: float = 4.0,
        class_names: list[str] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model"])
        self.model = model
        self.token = token
        self.num_classes = num_classes
        self.loss_fn = nn.CrossEntropyLoss(ignore_index=ignore_index)
        self.causal = bool(getattr(model, "causal_mask", True))
        # ModuleDict keys may not shadow nn.Module attributes such as `train`: suffix them
        self.metrics = nn.ModuleDict({f"{s}_split": make_metrics(num_classes) for s in SPLITS})
        self.final_splits: tuple[str, ...] = ("test",)
        self._outputs: dict[str, list[dict[str, torch.Tensor]]] = {}
        # filled by the final trainer.test: metrics and per-example outputs of each split
        self.final_results: dict[str, float] = {}
        self.final_outputs: dict[str, dict[str, torch.Tensor]] = {}
        start = first_trainable_block(trainable, len(model.trf_blocks))
        self.trunk_cache: TrunkCache | None = None
        self._cache_setting = cache_trunk
        self._cache_budget = cache_memory_budget_gb
        self._trunk_end = start

    # ------------------------------------------------------------------ forward
    def needed_length(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> int:
        """How many leading positions the pooled token depends on.

        With a causal mask, position t sees only positions <= t, so `first` needs 1 position and
        `flexible`/`mean` need the longest real length: the rest is padding whose outputs are never
        read. Cutting it is exact and makes the cost follow the real lengths.
        """
        full = input_ids.shape[1]
        if not self.causal or self.token == "last":
            return full
        if self.token == "first":
            return 1
        return min(full, int(lengths.max()))

    def pooled_positions(self, width: int, lengths: torch.Tensor) -> torch.Tensor | None:
        """The one position per row that the pooled token reads, or None for ``mean``.

        ``last`` -> width-1, ``first`` -> 0, ``flexible`` -> lengths-1 (inputs already cut to
        ``width`` positions). Only these rows of the last block's output are ever used, which
        is what lets ``forward`` prune that block.
        """
        batch = lengths.shape[0]
        if self.token == "last":
            return torch.full((batch,), width - 1, dtype=torch.long, device=lengths.device)
        if self.token == "first":
            return torch.zeros(batch, dtype=torch.long, device=lengths.device)
        if self.token == "flexible":
            return (lengths.long() - 1).clamp(min=0, max=width - 1)
        return None

    def forward(
        self,
        input_ids: torch.Tensor,
        lengths: torch.Tensor | None = None,
        index: torch.Tensor | None = None,
        split: str | None = None,
    ) -> torch.Tensor:
        """Class logits ``[B, num_classes]`` for a batch of token ids.

        Three exact shortcuts, each equal to the full forward within float rounding: the
        frozen trunk's states come from the cache when it holds this split; inputs are cut to
        the positions the pooled token can see (``needed_length``); and the last block runs
        only at the pooled position (``TransformerBlock.forward_at``) unless pooling is
        ``mean``, which reads every position.
        """
        if lengths is None:
            lengths = torch.full((input_ids.shape[0],), input_ids.shape[1], device=input_ids.device)
        width = self.needed_length(input_ids, lengths)
        cache = self.trunk_cache
        if cache is not None and split is not None and index is not None and cache.has(split):
            x = cache.lookup(split, index, width, device=input_ids.device)
            start = cache.start_block
        else:
            x = self.model.embed(input_ids[:, :width])
            start = 0
        n_blocks = len(self.model.trf_blocks)
        positions = self.pooled_positions(width, lengths.to(input_ids.device))
        last_block = self.model.trf_blocks[n_blocks - 1] if start < n_blocks else None
        # an FSDP-wrapped block must go through its own forward (which gathers its weights)
        if positions is not None and isinstance(last_block, TransformerBlock):
            x = self.model.run_blocks(x, start=start, end=n_blocks - 1)
            x = last_block.forward_at(x, positions)
            return self.model.out_head(self.model.final_norm(x))
        x = self.model.final_norm(self.model.run_blocks(x, start=start))
        # pool before the (affine) head: identical result, computed on B rows instead of B*T
        return self.model.out_head(pool_logits(x, lengths, self.token))

    def batch_logits(self, batch: dict, split: str | None = None) -> torch.Tensor:
        return self(batch["input_ids"], batch["lengths"], batch.get("index"), split)

    def batch_loss(self, batch: dict, split: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.batch_logits(batch, split)
        return self.loss_fn(logits.float(), batch["labels"]), logits

    # ------------------------------------------------------------------ cache
    def _maybe_build_cache(self, splits: tuple[str, ...], planned: tuple[str, ...] = ()) -> None:
        """Compute the frozen trunk once per example for ``splits`` (when allowed).

        ``planned`` are splits cached later (the final test's): with ``cache.trunk=true`` the
        memory budget must hold them too, which is checked now, before any training.
        """
        if self._cache_setting in (False, "false", "off") or self.trainer is None:
            return
        dm = getattr(self.trainer, "datamodule", None)
        reason = None
        if self._trunk_end is None:
            reason = "the whole model trains (trainable=all or lora)"
        elif dm is None:
            reason = "no datamodule"
        elif self.model.drop_emb.p > 0 or any(
            m.p > 0 for b in self.model.trf_blocks[: self._trunk_end] for m in b.modules()
            if isinstance(m, nn.Dropout)
        ):
            reason = "dropout in the frozen trunk makes it non-deterministic"
        elif not self.causal and getattr(dm, "padding", "longest") != "longest":
            reason = "without a causal mask, padding changes every position"
        cache = self.trunk_cache
        todo: list[str] = []
        if reason is None:
            if cache is None:
                # store what the uncached forward feeds the first trainable block: float32,
                # unless the weights themselves are half precision (bf16-true / 16-true)
                dtype = next(self.model.parameters()).dtype
                cache = TrunkCache(
                    self._trunk_end,
                    token=self.token,
                    causal=self.causal,
                    dtype=dtype if dtype.is_floating_point else torch.float32,
                )
            todo = [s for s in splits if not cache.has(s)]
            later = [
                s for s in dict.fromkeys(planned)
                if s not in todo and not cache.has(s) and getattr(dm, f"{s}_dataset", None) is not None
            ]
            sizes = {
                s: cache.estimate_bytes(_dataset(dm, s), self.model, dm.max_length)
                for s in (*todo, *later)
            }
            budget = float(self._cache_budget) * 2**30
            need = cache.nbytes + sum(sizes[s] for s in todo)
            need_all = need + sum(sizes[s] for s in later)
            if self._cache_setting in (True, "true", "on") and need_all > budget:
                cached = [s for s in SPLITS if cache.has(s) or s in sizes]
                reason = (
                    f"the cache of {_split_names(cached)} would need {need_all / 2**30:.3f} GiB, "
                    f"over cache.memory_budget_gb={self._cache_budget}; raise "
                    f"cache.memory_budget_gb to {math.ceil(need_all / 2**30 * 1000) / 1000:g} or "
                    "more, or use cache.trunk=auto (caches what fits)"
                )
            elif need > budget:
                reason = (
                    f"the cache would need {need / 2**30:.2f} GiB, over "
                    f"cache.memory_budget_gb={self._cache_budget}"
                )
        if reason is not None:
            if self._cache_setting in (True, "true", "on"):
                raise TrunkCacheError(f"cache.trunk=true but caching is not possible: {reason}.")
            log.info("Frozen-trunk cache off for %s: %s.", ", ".join(splits), reason)
            return
        assert cache is not None
        self.trunk_cache = cache  # only once it holds something: `trunk_cache` means "in use"
        if not todo:
            return
        with self.trainer.precision_plugin.forward_context():
            for split in todo:
                cache.build(
                    split, self.model, _dataset(dm, split), dm.max_length, dm.pad_token_id, self.device
                )
        log.info(
            "Frozen-trunk cache: blocks 0..%d computed once for %s (%.1f MiB).",
            self._trunk_end - 1, ", ".join(todo), cache.nbytes / 2**20,
        )

    def on_fit_start(self) -> None:
        # the final test caches its splits too: budget for them now, not after training
        self._maybe_build_cache(("train", "val"), planned=self.final_splits)

    def on_test_start(self) -> None:
        self._maybe_build_cache(self.final_splits)

    def on_validation_start(self) -> None:
        if not self.trainer.training:
            self._maybe_build_cache(("val",))

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, logits = self.batch_loss(batch, "train")
        bs = batch["labels"].shape[0]
        self.metrics["train_split"].update(logits.detach().float(), batch["labels"])
        self.log("train/loss", loss, on_step=True, on_epoch=True, batch_size=bs, prog_bar=True)
        return loss

    def on_train_batch_end(self, outputs: object, batch: dict, batch_idx: int) -> None:
        if batch_idx + 1 == self.trainer.num_training_batches:
            self._exhaust_sampler_like_the_chapter()

    def _exhaust_sampler_like_the_chapter(self) -> None:
        """Make the shuffling generator advance as the chapter's loop does at the end of an epoch.

        The chapter iterates ``for batch in train_loader`` until StopIteration, and torch's
        ``RandomSampler`` draws one more ``randperm(n, generator)`` when it is exhausted (the
        ``num_samples % n`` tail). Lightning stops after ``len(loader)`` batches instead, so
        without this draw every later epoch (and the chapter monitor's epoch-end accuracy
        batches) would see a different order than the chapter. Module hooks run after the
        callbacks' ``on_train_batch_end``, i.e. after the chapter monitor's evaluation of the
        last step, which is when the chapter's loop exhausts its loader. Only for a complete
        epoch over a plain shuffled DataLoader (no bucketing, no distributed sampler).
        """
        loader = self.trainer.train_dataloader
        sampler = getattr(loader, "sampler", None)
        if not (
            isinstance(loader, torch.utils.data.DataLoader)
            and type(sampler) is torch.utils.data.RandomSampler
            and sampler.generator is not None
            and not sampler.replacement
            and self.trainer.num_training_batches == len(loader)
        ):
            return
        n = len(sampler.data_source)
        if n and sampler.num_samples == n:
            torch.randperm(n, generator=sampler.generator)

    def on_train_epoch_end(self) -> None:
        self._log_metrics(self.metrics["train_split"], "train")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss, logits = self.batch_loss(batch, "val")
        bs = batch["labels"].shape[0]
        self.metrics["val_split"].update(logits.float(), batch["labels"])
        self.log("val/loss", loss, on_epoch=True, batch_size=bs, prog_bar=True, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        self._log_metrics(self.metrics["val_split"], "val", prog_bar=True)

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Keep per-example results: the final metrics count every example exactly once."""
        split = self.final_splits[dataloader_idx]
        logits = self.batch_logits(batch, split).float()
        losses = F.cross_entropy(
            logits, batch["labels"], ignore_index=self.loss_fn.ignore_index, reduction="none"
        )
        self._outputs.setdefault(split, []).append(
            {
                "index": batch["index"],
                "labels": batch["labels"],
                "probs": torch.softmax(logits, dim=-1),
                "losses": losses,
            }
        )

    def on_test_epoch_start(self) -> None:
        self._outputs: dict[str, list[dict[str, torch.Tensor]]] = {}

    def _gather_split(self, split: str) -> dict[str, torch.Tensor]:
        """All ranks' outputs for one split, de-duplicated by example index.

        A distributed sampler pads the last rank with repeated examples; de-duplicating makes
        the full-set metrics cover each example exactly once whatever the world size.
        """
        parts = self._outputs.get(split, [])
        local = {
            k: torch.cat([p[k] for p in parts]) if parts else torch.empty(0, device=self.device)
            for k in ("index", "labels", "probs", "losses")
        }
        if self.trainer is not None and self.trainer.world_size > 1:
            gathered = self.all_gather(local)
            local = {k: v.flatten(0, 1) for k, v in gathered.items()}
        order = torch.argsort(local["index"], stable=True)
        local = {k: v[order] for k, v in local.items()}
        keep = torch.ones_like(local["index"], dtype=torch.bool)
        keep[1:] = local["index"][1:] != local["index"][:-1]
        return {k: v[keep] for k, v in local.items()}

    def on_test_epoch_end(self) -> None:
        results: dict[str, float] = {}
        self.final_outputs = {}
        for split in self.final_splits:
            out = self._gather_split(split)
            self.final_outputs[split] = {k: v.cpu() for k, v in out.items()}
            metrics = make_metrics(self.num_classes).to(out["probs"].device)
            metrics.sync_on_compute = False  # already gathered: every rank holds the full split
            for m in metrics.values():
                m.sync_on_compute = False
            values = {k: _positive(v) for k, v in metrics(out["probs"], out["labels"]).items()}
            counted = out["labels"] != self.loss_fn.ignore_index
            values["loss"] = out["losses"][counted].mean() if counted.any() else torch.tensor(0.0)
            values["count"] = torch.tensor(float(len(out["labels"])))
            for name, value in values.items():
                results[f"{split}_{name}"] = float(value)
        for key, value in results.items():
            if not key.endswith("_count"):
                self.log(f"final/{key}", value, add_dataloader_idx=False, rank_zero_only=True)
        self.final_results = results

    def _log_metrics(self, metrics: MetricCollection, split: str, prog_bar: bool = False) -> None:
        values = metrics.compute()
        short = {"accuracy": "acc"}
        for name, value in values.items():
            self.log(
                f"{split}/{short.get(name, name)}",
                _positive(value),
                prog_bar=prog_bar and name == "accuracy",
            )
        metrics.reset()

    # ------------------------------------------------------------------ optimizer
    def configure_optimizers(self) -> torch.optim.Optimizer:
        """The chapter's AdamW, as one fused kernel where torch has one.

        Fused AdamW does the same arithmetic (results agree to ~1e-8 after 50 steps) but is
        about 3x faster on CPU than the default per-tensor loop, which matters once the frozen
        trunk is cached: the optimizer step is then a large part of each training step.
        """
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("No trainable parameters: check the `trainable` option.")
        fused = all(
            p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float64)
            for p in params
        )
        return torch.optim.AdamW(
            params,
            lr=self.hparams.lr,
            weight_decay=self.hparams.weight_decay,
            fused=fused or None,
        )

    def predict_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return F.softmax(self.batch_logits(batch).float(), dim=-1)
