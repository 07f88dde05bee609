"""Hydra entry point: ``python train.py <overrides>`` or ``spam-train <overrides>``.

config -> datamodule + model -> Lightning Trainer -> run folder (metrics.json, plots, bundle,
checkpoints, TensorBoard events).
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import LearningRateMonitor, ProgressBar
from omegaconf import DictConfig, OmegaConf

from spam_lightning.bundle import save_bundle
from spam_lightning.classifier import TOKENS, TRAINABLE, make_classifier
from spam_lightning.io_utils import write_json
from spam_lightning.model import MODEL_CONFIGS
from spam_lightning.module import SpamClassifier
from spam_lightning.plots import plot_values
from spam_lightning.weights import build_gpt

log = logging.getLogger(__name__)

# conf/ sits beside the package in the checkout (install with `pip install -e .`)
CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "conf")
FINAL_SPLITS = ("train", "val", "test")
SPLIT_TITLES = {"train": "Training", "val": "Validation", "test": "Test"}


def validate_config(cfg: DictConfig) -> None:
    """Fail on bad names and impossible combinations before any download or tokenizing."""
    problems = []
    if cfg.model.name not in MODEL_CONFIGS:
        problems.append(
            f"model.name={cfg.model.name!r} is unknown; allowed: {', '.join(MODEL_CONFIGS)}"
        )
    if cfg.model.weights not in ("pretrained", "random"):
        problems.append(f"model.weights={cfg.model.weights!r}; allowed: pretrained, random")
    if cfg.trainable.name not in TRAINABLE:
        problems.append(
            f"trainable={cfg.trainable.name!r} is unknown; allowed: {', '.join(TRAINABLE)}"
        )
    if cfg.token.name not in TOKENS:
        problems.append(f"token={cfg.token.name!r} is unknown; allowed: {', '.join(TOKENS)}")
    if cfg.trainable.name == "last_two_blocks" and cfg.model.n_layers < 2:
        problems.append(
            f"trainable=last_two_blocks needs at least 2 transformer blocks; model {cfg.model.name} "
            f"has n_layers={cfg.model.n_layers}. Use trainable=last_block or a larger model."
        )
    if str(cfg.cache.trunk).lower() not in ("auto", "true", "false"):
        problems.append(f"cache.trunk={cfg.cache.trunk!r}; allowed: auto, true, false")
    if problems:
        raise ValueError("Invalid configuration:\n  - " + "\n  - ".join(problems))


def _cache_setting(value: Any) -> str | bool:
    text = str(value).lower()
    return {"true": True, "false": False}.get(text, "auto")


def build_model(cfg: DictConfig, num_classes: int) -> torch.nn.Module:
    """GPT-2 (pretrained or random) turned into a classifier per ``trainable``."""
    m = cfg.model
    torch.manual_seed(cfg.seed)  # random weights are reproducible too
    model = build_gpt(
        m.name,
        weights=m.weights,
        checkpoint=m.checkpoint,
        causal_mask=m.causal_mask,
        drop_rate=m.drop_rate,
    )
    model = make_classifier(
        model,
        num_classes=num_classes,
        trainable=cfg.trainable.name,
        rank=cfg.trainable.get("rank", 16),
        alpha=cfg.trainable.get("alpha", 16),
        seed=cfg.seed,
    )
    if m.get("compile", False):
        for block in model.trf_blocks:
            block.compile(dynamic=True)
    return model


def _num_batches(datamodule) -> dict[str, int]:
    return {
        "train": len(datamodule.train_dataloader()),
        "val": len(datamodule.val_dataloader()),
        "test": len(datamodule.test_dataloader()),
    }


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one training job; returns the metrics written to ``metrics.json``."""
    validate_config(cfg)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True)

    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")

    model = build_model(cfg, datamodule.num_classes)
    module = SpamClassifier(
        model,
        num_classes=datamodule.num_classes,
        token=cfg.token.name,
        trainable=cfg.trainable.name,
        lr=cfg.optimizer.lr,
        weight_decay=cfg.optimizer.weight_decay,
        ignore_index=cfg.loss.ignore_index,
        cache_trunk=_cache_setting(cfg.cache.trunk),
        cache_memory_budget_gb=cfg.cache.memory_budget_gb,
        class_names=list(datamodule.class_names),
    )
    loggers = [hydra.utils.instantiate(c) for c in (cfg.get("logger") or {}).values() if c]
    callbacks = [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
    if not loggers:  # nothing to monitor the learning rate into
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    if cfg.trainer.get("enable_progress_bar") is False:  # the flag wins over the callbacks group
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    trainer: L.Trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False
    )

    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    wall = time.perf_counter() - start

    module.final_splits = FINAL_SPLITS
    datamodule.setup("test")
    trainer.test(
        module,
        dataloaders=[datamodule.eval_dataloader(s) for s in FINAL_SPLITS],
        verbose=False,
    )
    final = module.final_results
    monitor = next((c for c in trainer.callbacks if hasattr(c, "history")), None)
    training_seconds = monitor.training_seconds if monitor else wall

    metrics: dict[str, Any] = {}
    for split in FINAL_SPLITS:
        for name in ("accuracy", "loss", "precision", "recall", "f1"):
            metrics[f"{split}_{name}"] = final[f"{split}_{name}"]
        metrics[f"{split}_count"] = int(final[f"{split}_count"])
    metrics.update(
        {
            "examples_seen": monitor.examples_seen if monitor else None,
            "training_seconds": round(training_seconds, 3),
            "max_length": int(datamodule.max_length),
            "num_batches": _num_batches(datamodule),
            "model": cfg.model.name,
            "weights": cfg.model.weights,
            "trainable": cfg.trainable.name,
            "token": cfg.token.name,
            "padding": cfg.data.padding,
            "seed": int(cfg.seed),
            "epochs": int(trainer.current_epoch),
            "global_step": int(trainer.global_step),
            "precision": str(trainer.precision),
            "device": _device_name(trainer),
            "trunk_cache": module.trunk_cache is not None,
            "experiment": _experiment_name(cfg),
        }
    )
    if trainer.is_global_zero:
        _print_final(metrics)
        _write_artifacts(cfg, output_dir, module, datamodule, monitor, metrics, trainer)
    return metrics


def _experiment_name(cfg: DictConfig) -> str | None:
    try:
        choices = HydraConfig.get().runtime.choices
        return choices.get("experiment")
    except ValueError:  # not running under Hydra (tests calling train() directly)
        return None


def _device_name(trainer: L.Trainer) -> str:
    device = trainer.strategy.root_device
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} x{trainer.world_size}" if trainer.world_size > 1 else device.type


def _print_final(metrics: dict[str, Any]) -> None:
    minutes = metrics["training_seconds"] / 60
    print(f"Training completed in {minutes:.2f} minutes.")
    for split in FINAL_SPLITS:
        print(f"{SPLIT_TITLES[split]} accuracy: {metrics[f'{split}_accuracy'] * 100:.2f}%")
    for split in FINAL_SPLITS:
        print(f"{SPLIT_TITLES[split]} loss: {metrics[f'{split}_loss']:.3f}")


def _write_artifacts(cfg, output_dir, module, datamodule, monitor, metrics, trainer) -> None:
    """metrics.json, the resolved config, plots, the bundle and the hparams dashboard."""
    write_json(output_dir / "metrics.json", metrics)
    job_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    resolved = OmegaConf.to_yaml(job_cfg, resolve=True)
    (output_dir / "config.yaml").write_text(resolved, encoding="utf-8")
    if monitor is not None and monitor.history["train_losses"]:
        h = monitor.history
        epochs = max(1, int(cfg.trainer.max_epochs))
        plot_values(epochs, monitor.examples_seen, h["train_losses"], h["val_losses"], "loss", output_dir)
        plot_values(epochs, monitor.examples_seen, h["train_accs"], h["val_accs"], "accuracy", output_dir)
        write_json(output_dir / "history.json", h)
    save_bundle(
        output_dir,
        module.model,
        class_names=list(datamodule.class_names),
        token=cfg.token.name,
        max_length=datamodule.max_length,
        padding=cfg.data.padding,
        pad_token_id=datamodule.pad_token_id,
        extra={"trained": {k: metrics[k] for k in ("model", "weights", "trainable", "seed")}},
    )
    for lg in trainer.loggers:
        hparams = {
            "model": cfg.model.name, "weights": cfg.model.weights, "trainable": cfg.trainable.name,
            "token": cfg.token.name, "padding": cfg.data.padding, "max_length": metrics["max_length"],
            "lr": cfg.optimizer.lr, "weight_decay": cfg.optimizer.weight_decay,
            "batch_size": cfg.data.batch_size, "seed": cfg.seed, "precision": metrics["precision"],
        }
        final = {
            f"hparams/{k}": metrics[k]
            for k in metrics
            if k.endswith(("_accuracy", "_loss", "_f1"))
        }
        lg.log_hyperparams(hparams, metrics=final)
        lg.save()


def nested_options(group: str, config_dir: str = CONFIG_DIR) -> list[str]:
    """Every config of a group, sub-folders included (`table/row01`), as `group=` accepts them."""
    root = Path(config_dir) / group
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))


def expand_nested_globs(argv: list[str], config_dir: str = CONFIG_DIR) -> list[str]:
    """Expand `group=glob(...)` over sub-folders too, e.g. `experiment=glob(table/*)`.

    Hydra's own glob lists only the top level of a config group; the pattern is parsed by
    Hydra's override parser and matched against the nested names, then handed back as a list.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import Glob

    out = []
    parser = OverridesParser.create()
    for arg in argv:
        if "=glob(" in arg and not arg.startswith("-"):
            override = parser.parse_override(arg)
            group = override.key_or_group
            if isinstance(override._value, Glob) and (Path(config_dir) / group).is_dir():
                names = override._value.filter(nested_options(group, config_dir))
                if not names:
                    raise SystemExit(f"{arg}: no config in conf/{group} matches")
                arg = f"{override.get_key_element()}={','.join(names)}"
        out.append(arg)
    return out


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def _hydra_main(cfg: DictConfig) -> float | None:
    """Train, and return the metric an Optuna sweep optimizes."""
    metrics = train(cfg)
    return metrics.get(cfg.get("optimized_metric", "val_accuracy"))


def main() -> None:
    """`python train.py` / `spam-train`: Hydra's command line, with nested config globs."""
    sys.argv = [sys.argv[0], *expand_nested_globs(sys.argv[1:])]
    _hydra_main()


if __name__ == "__main__":
    main()
