"""The frozen trunk as a feature-extraction step (``model/trunk_cache.py``): when fitting starts and
ends, each split's token ids become hidden states once, which the datamodule serves instead."""

from __future__ import annotations

import logging
import math
import time
from functools import partial
from typing import Any

import lightning as L
import torch
from torch import nn

from spam_lightning.model.trunk_cache import (
    SharedTrunkStore,
    TrunkCache,
    TrunkCacheError,
    is_sharded,
)

log = logging.getLogger(__name__)


class TrunkCaching(L.Callback):
    """Computes blocks ``0..start_block-1`` (None: nothing frozen) once per example. The ``cache``
    config section: ``trunk`` ``auto`` caches what fits in ``memory_budget_gb`` GiB, ``true``
    fails if anything does not, ``false`` never caches; ``shared``: in ``dir`` (``max_gb``)."""

    def __init__(self, start_block: int | None, datamodule: Any, *, trunk: str | bool = "auto",
                 memory_budget_gb: float = 4.0, shared: bool = False,
                 dir: str | None = None, max_gb: float = 10.0) -> None:  # noqa: A002
        self.start_block, self.datamodule = start_block, datamodule
        self.setting = {"true": True, "false": False}.get(str(trunk).lower(), "auto")
        self.budget_gb = memory_budget_gb
        self.store = SharedTrunkStore(dir, float(max_gb) * 2**30) if shared and dir else None
        self.cache: TrunkCache | None = None
        self.seconds: dict[str, float] = {}  # split -> time its cache took to build (or load)

    @property
    def active(self) -> bool:
        return self.cache is not None

    def on_fit_start(self, trainer, pl_module) -> None:
        # the final test caches its splits too: budget for them now, not after training
        self.build(trainer, pl_module, ("train", "val"), planned=pl_module.final_splits)

    def on_fit_end(self, trainer, pl_module) -> None:  # before the final evaluation's loaders
        self.build(trainer, pl_module, pl_module.final_splits)

    def _reason(self, model: nn.Module) -> str | None:
        if self.start_block is None:
            return "the whole model trains (trainable=all or lora)"
        frozen = [model.drop_emb, *model.trf_blocks[: self.start_block]]
        if any(isinstance(m, nn.Dropout) and m.p > 0 for f in frozen for m in f.modules()):
            return "dropout in the frozen trunk makes it non-deterministic"
        if not model.causal_mask and self.datamodule.padding != "longest":
            return "without a causal mask, padding changes every position"
        return None

    def build(self, trainer, pl_module, splits: tuple[str, ...], planned: tuple[str, ...] = ()) -> None:
        """Cache ``splits`` (when allowed) and hand them to the datamodule as features;
        ``cache.trunk=true`` budgets the ``planned`` ones (cached later) now."""
        if self.setting is False:
            return
        model, strict, dm = pl_module.model, self.setting is True, self.datamodule
        # what the uncached forward feeds the first trainable block: float32 unless bf16-true
        dtype = next(model.parameters()).dtype
        cache = self.cache or TrunkCache(self.start_block or 0, token=model.pooling, causal=model.causal_mask,
                                         dtype=dtype if dtype.is_floating_point else torch.float32)
        todo = [s for s in splits if not cache.has(s)]
        later = [s for s in dict.fromkeys(planned) if s not in todo and not cache.has(s)]
        reason = (self._reason(model) or (None if strict else few_batches(trainer))
                  or self._over_budget(cache, model, todo, later, strict))
        if reason is not None:
            if strict:
                raise TrunkCacheError(f"cache.trunk=true but caching is not possible: {reason}.")
            log.info("Frozen-trunk cache off for %s: %s.", ", ".join(splits), reason)
            return
        self.cache, store = cache, self.store
        if todo and store is not None and is_sharded(model, cache.start_block):
            log.info("Frozen-trunk cache not shared: the frozen trunk is sharded (FSDP).")
            store = None
        if todo and store is not None:
            digest = cache.config_digest(model, pl_module.device, str(trainer.precision))
        device, pad_to = pl_module.device, dm.max_length if dm.padding == "longest" else None
        for split in todo:
            t0, dataset = time.perf_counter(), dm.token_dataset(split)
            compute = partial(cache.build, split, model, dataset, dm.max_length, dm.pad_token_id, device)
            with trainer.precision_plugin.forward_context():
                if store is None:
                    compute()
                else:  # or load them from an earlier run's file
                    key = cache.split_key(digest, dataset, dm.max_length, dm.pad_token_id)
                    store.fetch(cache, split, key, compute, partial(
                        cache.load, split, key=key, dataset=dataset, model=model, max_length=dm.max_length))
            self.seconds[split] = time.perf_counter() - t0
            dm.use_features(split, cache.features(split, dataset, pad_to))
        if todo:
            log.info("Frozen-trunk cache: blocks 0..%d computed once for %s (%.1f MiB).",
                     self.start_block - 1, ", ".join(todo), cache.nbytes / 2**20)

    def _over_budget(self, cache, model, todo: list[str], later: list[str], strict: bool) -> str | None:
        """Why ``todo`` (and, when ``strict``, ``later``) do not fit ``budget_gb``, or None."""
        dm = self.datamodule
        sizes = {s: cache.estimate_bytes(dm.token_dataset(s), model, dm.max_length) for s in (*todo, *later)}
        budget = float(self.budget_gb) * 2**30
        need = cache.nbytes + sum(sizes[s] for s in todo)
        need_all = need + sum(sizes[s] for s in later)
        if strict and need_all > budget:
            cached = [s for s in ("train", "val", "test") if cache.has(s) or s in sizes]
            names = ", ".join(cached[:-1]) + f" and {cached[-1]}" if len(cached) > 1 else "".join(cached)
            return (f"the cache of {names} would need {need_all / 2**30:.3f} GiB, over "
                    f"cache.memory_budget_gb={self.budget_gb}; raise cache.memory_budget_gb to "
                    f"{math.ceil(need_all / 2**30 * 1000) / 1000:g} or more, or use cache.trunk=auto "
                    "(caches what fits)")
        if need > budget:
            return f"the cache would need {need / 2**30:.2f} GiB, over cache.memory_budget_gb={self.budget_gb}"
        return None


def few_batches(trainer) -> str | None:
    """Why caching costs more than the batches of a debugging run: Lightning's
    ``fast_dev_run`` and ``overfit_batches`` read a few batches, the cache every example."""
    if trainer.fast_dev_run:
        what = f"trainer.fast_dev_run reads {int(trainer.fast_dev_run)} batch(es) of each split"
    elif trainer.overfit_batches:
        what = f"trainer.overfit_batches={trainer.overfit_batches} reads a few batches"
    else:
        return None
    return (f"{what}, the cache would run the frozen blocks over every example "
            "(cache.trunk=true caches anyway)")
