"""A model family: one module and one ``conf/model/*.yaml`` (whose ``_target_`` names the class)
per kind of model. Training, checks, inference and the sweep summary ask the family, never
compare kinds; a bundle names its family (``bundle.json``'s ``kind``)."""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import torch
from omegaconf import DictConfig
from torch import nn

FINAL_SPLITS = ("train", "val", "test")
# imported when a bundle names them; any other family registers itself when its module is imported
BUILTIN = {
    "gpt2": "spam_lightning.model.gpt2:GPT2Family",
    "encoder": "spam_lightning.model.encoder:EncoderFamily",
    "baseline": "spam_lightning.model.baselines:BaselineFamily",
    "decoder": "spam_lightning.model.decoder:DecoderFamily",
}
_REGISTRY: dict[str, type[ModelFamily]] = {}


def family_class(kind: str) -> type[ModelFamily]:
    """The family a bundle names; KeyError for one this process does not know."""
    if kind not in _REGISTRY and (target := BUILTIN.get(kind)):
        module, name = target.split(":")
        getattr(importlib.import_module(module), name)  # registers it
    return _REGISTRY[kind]


def known_kinds() -> list[str]:
    return sorted({*BUILTIN, *_REGISTRY})


@dataclass
class Fitted:
    """What ``fit`` hands back: the model to bundle, each final split's metrics, the chapter
    monitor's history and the run's facts (the fields after ``history``, metrics.json's keys)."""

    model: Any
    final: dict[str, float]
    history: dict[str, list[float]] | None
    examples_seen: int | None
    training_seconds: float
    max_length: int | None  # None: no tokens (every word counts)
    num_batches: dict[str, int] | None
    epochs: int
    global_step: int
    precision: str
    device: str
    trunk_cache: bool = False

    def facts(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)[3:]}


class Predictor:
    """A bundle's model with its preprocessing, as spam-classify and spam-serve call it."""

    model: Any = None
    device: torch.device = torch.device("cpu")
    pad_token_id: int = 0
    max_length: int | None = None  # None: every word counts (no tokens)
    token: str | None = None
    padding: str | None = None
    dynamic: bool = False  # messages grouped by length and padded per batch (exact)
    batch_size: int | None = None  # a cap (1: nothing may be padded)

    def encode(self, texts: list[str]) -> list[Any]:
        return texts

    def probs(self, items: list[Any]) -> torch.Tensor:
        """Class probabilities ``[len(items), num_classes]`` (float32, CPU) of right-padded token
        ids, padded to ``max_length`` (``padding=longest``, not ``dynamic``) or the batch's longest."""
        from spam_lightning.data.tokens import collate

        longest = not self.dynamic and self.padding == "longest"
        batch = collate(items, padding="longest" if longest else "batch",
                        max_length=self.max_length if longest else None, pad_token_id=self.pad_token_id)
        with torch.inference_mode():
            logits = self.model(batch["input_ids"].to(self.device), batch["lengths"].to(self.device))
        return torch.softmax(logits.float(), dim=-1).cpu()

    def describe(self) -> Any:
        """What ``/api/health`` says about the model."""
        return None


class ModelFamily:
    """One kind of model: its config checks, weights, tokenizer, build, training and bundle. The
    defaults train an ``nn.Module`` (``forward(input_ids, lengths) -> logits``) with Lightning."""

    kind: ClassVar[str] = ""
    # what the bundle records of the run (bundle.json's "trained"), from metrics.json
    trained_keys: ClassVar[tuple[str, ...]] = ("model", "weights", "trainable", "seed")
    # what rebuilds the model with nothing to download or compile (the FSDP bundle's copy)
    plain_options: ClassVar[dict[str, Any]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("kind"):
            _REGISTRY[cls.kind] = cls

    def problems(self, cfg: DictConfig) -> list[str]:
        """Every problem of the config for this family, one line each (cheap: no I/O)."""
        from spam_lightning.training.checks import run_problems

        return run_problems(cfg)

    def preflight(self, cfg: DictConfig) -> None:
        """Raise if the weights (or tokenizer) cannot be had: before the data is prepared."""

    def check_resume(self, cfg: DictConfig, path: Path, checkpoint: dict, num_classes: int | None) -> None:
        """Compare a resumed checkpoint with the model before data work (``fit`` checks again)."""

    def base_identity(self, cfg: DictConfig) -> dict[str, Any] | None:
        """Where the frozen weights come from (``model/base.py``), as checkpoints and bundles
        record it; None: the family cannot name it (checkpoints still check its digest)."""
        return None

    def tokenizer(self, cfg: DictConfig) -> Any | None:
        """The data module's tokenizer (``use_tokenizer``); None: GPT-2's."""
        return None

    def build(self, cfg: DictConfig, num_classes: int) -> nn.Module:
        raise NotImplementedError

    def callbacks(self, cfg: DictConfig, model: nn.Module, datamodule: Any) -> list[Any]:
        return []

    def trunk_cached(self) -> bool:
        """Whether training ran on cached frozen-trunk states (metrics.json's trunk_cache)."""
        return False

    def recorded(self, cfg: DictConfig) -> dict[str, Any]:
        """The model's options as metrics.json, the sweep summary and the bundle record them."""
        return {"model": cfg.model.name, "weights": cfg.model.get("weights"),
                "trainable": cfg.trainable.name, "token": None, "padding": cfg.data.padding}

    def hparams(self, cfg: DictConfig, metrics: dict[str, Any]) -> dict[str, Any]:
        keys = ("model", "weights", "trainable", "token", "padding", "max_length", "precision")
        return {**{k: metrics[k] for k in keys}, "lr": cfg.optimizer.lr,
                "weight_decay": cfg.optimizer.weight_decay, "batch_size": cfg.data.batch_size,
                "seed": cfg.seed}

    def fit(self, cfg: DictConfig, trainer: Any, datamodule: Any, ckpt_path: Path | None,
            checkpoint: dict | None) -> Fitted:
        """Lightning: data, model, fit, the final evaluation of every split."""
        import lightning as L

        from spam_lightning.training.callbacks import ChapterMonitor
        from spam_lightning.training.checks import check_resume_checkpoint
        from spam_lightning.training.module import TextClassifier, training_options

        L.seed_everything(cfg.seed, workers=True)
        if (tokenizer := self.tokenizer(cfg)) is not None:  # its own special tokens, pad token
            datamodule.use_tokenizer(tokenizer)
        datamodule.prepare_data()
        datamodule.setup("fit")
        model = self.build(cfg, datamodule.num_classes)
        module = TextClassifier(model, num_classes=datamodule.num_classes, trainable=cfg.trainable.name,
                                **training_options(cfg), final_splits=FINAL_SPLITS,
                                class_names=list(datamodule.class_names), base=self.base_identity(cfg))
        trainer.callbacks.extend(self.callbacks(cfg, model, datamodule))
        if checkpoint is not None:  # the head too, now that the data named the classes
            expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
            check_resume_checkpoint(cfg, ckpt_path, checkpoint, expected)
        # The chapter seeds once more right before its optimizer and loop; from here on only its
        # own loaders draw from the global RNG (a resume restores the saved state: RNGState).
        torch.manual_seed(cfg.seed)
        start = time.perf_counter()
        # weights_only: a checkpoint is data, never code (SafeCheckpointIO enforces it as well)
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        wall = time.perf_counter() - start
        datamodule.setup("test")
        trainer.test(module, dataloaders=final_loaders(datamodule, trainer), verbose=False)
        monitor = next((c for c in trainer.callbacks if isinstance(c, ChapterMonitor)), None)
        history = monitor.history if monitor is not None and monitor.history["train_losses"] else None
        return Fitted(
            self._bundle_model(cfg, trainer, module, datamodule.num_classes),
            module.test_results.metrics, history,
            examples_seen=monitor.examples_seen if monitor else None,
            training_seconds=round(monitor.training_seconds if monitor else wall, 3),
            max_length=int(datamodule.max_length),
            num_batches={s: len(getattr(datamodule, f"{s}_dataloader")()) for s in FINAL_SPLITS},
            epochs=int(trainer.current_epoch), global_step=int(trainer.global_step),
            precision=str(trainer.precision), device=_device_name(trainer),
            trunk_cache=self.trunk_cached(),
        )

    def _bundle_model(self, cfg: DictConfig, trainer: Any, module: Any, num_classes: int) -> Any:
        """The trained classifier, unsharded, for the bundle (rank 0; None elsewhere). Under FSDP
        every rank joins the gather (a collective call); rank 0 assigns it into a meta copy."""
        from lightning.pytorch.strategies import FSDPStrategy

        if not isinstance(trainer.strategy, FSDPStrategy):
            return module.model if trainer.is_global_zero else None
        full = trainer.strategy.lightning_module_state_dict()
        if not trainer.is_global_zero:
            return None
        return self.unsharded_copy(cfg, {k.removeprefix("model."): v for k, v in full.items()}, num_classes)

    def unsharded_copy(self, cfg: DictConfig, state: dict[str, torch.Tensor], num_classes: int) -> nn.Module:
        """``build`` (``plain_options``) on the meta device, then ``state`` assigned into it."""
        from omegaconf import OmegaConf

        plain = OmegaConf.merge(cfg, {"model": self.plain_options})
        with torch.device("meta"):
            model = self.build(plain, num_classes)
        model.load_state_dict(state, assign=True)
        return model

    def save(self, run_dir: Path, model: Any, datamodule: Any, cfg: DictConfig,
             trained: dict[str, Any]) -> Path:
        """Write ``run_dir/bundle`` (``bundle.json`` last, with ``kind``)."""
        raise NotImplementedError

    @classmethod
    def load(cls, folder: Path, config: dict[str, Any], device: torch.device,
             dtype: torch.dtype) -> Predictor:
        """The bundle in ``folder`` (``config``: its validated-format ``bundle.json``)."""
        raise NotImplementedError


def final_loaders(datamodule: Any, trainer: Any) -> list[Any]:
    """The final evaluation's loaders. One process: the chapter's own (the shuffled, drop_last
    training loader), so the final training accuracy is the book's; under DDP every example once."""
    if trainer.world_size == 1:
        return [datamodule.book_dataloader(s) for s in FINAL_SPLITS]
    return [datamodule.eval_dataloader(s) for s in FINAL_SPLITS]


def _device_name(trainer: Any) -> str:
    device = trainer.strategy.root_device
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} x{trainer.world_size}" if trainer.world_size > 1 else device.type
