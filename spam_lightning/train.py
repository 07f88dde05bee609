"""Hydra entry point: ``python train.py <overrides>`` or ``spam-train <overrides>``.

config -> datamodule + model -> Lightning Trainer -> run folder (metrics.json, plots, bundle,
checkpoints, TensorBoard events).
"""

from __future__ import annotations

import logging
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, ProgressBar
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from spam_lightning.bundle import save_bundle
from spam_lightning.callbacks import RNGState, SafeCheckpointIO, load_checkpoint_safely
from spam_lightning.classifier import TOKENS, TRAINABLE, make_classifier
from spam_lightning.data.tokens import PADDING_MODES
from spam_lightning.io_utils import write_json
from spam_lightning.model import CFG_KEYS, MODEL_CONFIGS, GPTModel
from spam_lightning.module import SpamClassifier
from spam_lightning.plots import plot_values
from spam_lightning.weights import (
    HUB_REPOS,
    CheckpointError,
    _check_tensors,
    _hf_plan,
    _normalise_keys,
    build_gpt,
    infer_config,
    open_tensors,
    resolve_weights_file,
)

log = logging.getLogger(__name__)

# conf/ sits beside the package in the checkout (install with `pip install -e .`)
CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "conf")
FINAL_SPLITS = ("train", "val", "test")
SPLIT_TITLES = {"train": "Training", "val": "Validation", "test": "Test"}
SIZE_KEYS = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers")
EXIT_SIGTERM = 143  # 128 + SIGTERM, what a shell reports for a process killed by SIGTERM


class TrainingInterrupted(SystemExit):
    """SIGTERM stopped training. Lightning's own SIGTERMException exits with status 0, which
    tells a scheduler or sweep the job succeeded; this one exits with 143."""


def _is_int(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _model_sizes(cfg: DictConfig) -> dict[str, Any]:
    """The model's sizes as configured (the config group's values, overrides included)."""
    m = cfg.model
    return {k: m.get(k, MODEL_CONFIGS.get(m.name, {}).get(k)) for k in (*SIZE_KEYS, "qkv_bias")}


def validate_config(cfg: DictConfig) -> None:
    """Fail on bad names and impossible combinations before any download or tokenizing.

    Every problem is listed at once, with the allowed values, so one run shows them all.
    """
    problems: list[str] = []
    m = cfg.model
    if m.name not in MODEL_CONFIGS:
        problems.append(
            f"model.name={m.name!r} is unknown; allowed: {', '.join(MODEL_CONFIGS)} "
            "(choose one with model=NAME)"
        )
    if m.weights not in ("pretrained", "random"):
        problems.append(f"model.weights={m.weights!r}; allowed: pretrained, random")
    if cfg.trainable.name not in TRAINABLE:
        problems.append(
            f"trainable.name={cfg.trainable.name!r} is unknown; allowed: {', '.join(TRAINABLE)} "
            "(choose one with trainable=NAME)"
        )
    if cfg.token.name not in TOKENS:
        problems.append(
            f"token.name={cfg.token.name!r} is unknown; allowed: {', '.join(TOKENS)} "
            "(choose one with token=NAME)"
        )
    sizes = _model_sizes(cfg)
    bad_sizes = [k for k in SIZE_KEYS if not _is_int(sizes[k], 1)]
    for key in bad_sizes:
        problems.append(f"model.{key}={sizes[key]!r}: must be an integer >= 1")
    if not bad_sizes and sizes["emb_dim"] % sizes["n_heads"]:
        problems.append(
            f"model.emb_dim={sizes['emb_dim']} is not divisible by model.n_heads={sizes['n_heads']}"
        )
    n_layers = sizes["n_layers"]
    if cfg.trainable.name == "last_two_blocks" and _is_int(n_layers, 1) and n_layers < 2:
        problems.append(
            f"trainable=last_two_blocks needs at least 2 transformer blocks; model {m.name} "
            f"has n_layers={n_layers}. Use trainable=last_block or a larger model."
        )
    if m.name in MODEL_CONFIGS and m.weights == "pretrained":
        problems += _pretrained_problems(cfg, sizes)
    elif m.weights == "random" and m.get("checkpoint") is not None:
        problems.append(
            f"model.checkpoint={m.checkpoint} is ignored with model.weights=random; drop one of "
            "them (checkpoints need model.weights=pretrained)"
        )
    problems += _data_problems(cfg.data, sizes["context_length"])
    if str(cfg.cache.trunk).lower() not in ("auto", "true", "false"):
        problems.append(f"cache.trunk={cfg.cache.trunk!r}; allowed: auto, true, false")
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path is not None and ckpt_path != "last" and not Path(str(ckpt_path)).is_file():
        problems.append(
            f"ckpt_path={ckpt_path}: no such file; pass a run's checkpoints/last.ckpt, or "
            "ckpt_path=last with hydra.run.dir=<the run folder>"
        )
    if problems:
        raise ValueError("Invalid configuration:\n  - " + "\n  - ".join(problems))


def _pretrained_problems(cfg: DictConfig, sizes: dict[str, Any]) -> list[str]:
    """Pretrained weights exist only for the released sizes (or a given checkpoint)."""
    m = cfg.model
    checkpoint = m.get("checkpoint")
    if checkpoint is not None:
        path = Path(str(checkpoint)).expanduser()
        return [] if path.exists() else [f"model.checkpoint={checkpoint}: no such file or folder"]
    if m.name not in HUB_REPOS:
        return [
            f"model {m.name} has no pretrained weights; use model.weights=random or "
            "model.checkpoint=/path/to/model.safetensors"
        ]
    released = MODEL_CONFIGS[m.name]
    differ = [k for k in SIZE_KEYS if sizes[k] != released[k]]
    if not differ:
        return []
    return [
        f"pretrained {m.name} has {', '.join(f'{k}={released[k]}' for k in differ)}, but the "
        f"config asks for {', '.join(f'{k}={sizes[k]}' for k in differ)}; other sizes need "
        "model.weights=random or a model.checkpoint of that size"
    ]


def _data_problems(d: DictConfig, context_length: Any) -> list[str]:
    """The loader options every datamodule shares (its ``__init__`` checks them again)."""
    problems = []
    batch_size, padding, max_length = d.get("batch_size"), d.get("padding"), d.get("max_length")
    if "batch_size" in d and not _is_int(batch_size, 1):
        problems.append(f"data.batch_size={batch_size!r}: must be an integer >= 1")
    if "padding" in d and padding not in PADDING_MODES:
        problems.append(f"data.padding={padding!r}; allowed: {', '.join(PADDING_MODES)}")
    if padding == "none" and _is_int(batch_size, 2):
        problems.append(
            f"data.padding=none cannot batch sequences of different lengths, but "
            f"data.batch_size={batch_size}: use data.batch_size=1 and "
            f"trainer.accumulate_grad_batches={batch_size} for an effective batch of {batch_size}"
        )
    if max_length is not None and max_length != "model":
        if not _is_int(max_length, 1):
            problems.append(
                f"data.max_length={max_length!r}: allowed values are null (the longest "
                "training sequence), model (the context length) or an integer >= 1"
            )
        elif _is_int(context_length, 1) and max_length > context_length:
            problems.append(
                f"data.max_length={max_length} exceeds the model's context length "
                f"{context_length}; use an integer <= {context_length}, or data.max_length=model"
            )
    return problems


def _cache_setting(value: Any) -> str | bool:
    text = str(value).lower()
    return {"true": True, "false": False}.get(text, "auto")


def build_model(cfg: DictConfig, num_classes: int) -> torch.nn.Module:
    """GPT-2 (pretrained or random) turned into a classifier per ``trainable``."""
    m = cfg.model
    torch.manual_seed(cfg.seed)  # random weights are reproducible too
    sizes = {k: v for k, v in _model_sizes(cfg).items() if k in CFG_KEYS}
    model = build_gpt(
        m.name,
        weights=m.weights,
        checkpoint=m.checkpoint,
        causal_mask=m.causal_mask,
        drop_rate=m.drop_rate,
        **sizes,  # the config's sizes, so e.g. model.n_layers=1 builds what validate_config checked
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


def _instantiate(node: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` that raises the target's own error (e.g. the datamodule's
    ``data.batch_size=0: must be an integer >= 1``) instead of Hydra's wrapper around it."""
    try:
        return hydra.utils.instantiate(node, **kwargs)
    except InstantiationException as err:
        if isinstance(err.__cause__, Exception):
            raise err.__cause__ from err
        raise


def _last_checkpoint(cfg: DictConfig, callbacks: list[Any]) -> Path | None:
    """What ``ckpt_path=last`` means (as in Lightning): the newest ``last*.ckpt`` of the
    ModelCheckpoint folders, or None before the first epoch-end checkpoint."""
    folders = {
        Path(cb.dirpath) if cb.dirpath else Path(cfg.paths.output_dir) / "checkpoints"
        for cb in callbacks
        if isinstance(cb, ModelCheckpoint)
    }
    found = [
        p for folder in folders if folder.is_dir() for p in folder.glob("last*.ckpt")
        if p.stem == "last" or p.stem.removeprefix("last-").isdigit()
    ]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def _resolve_ckpt_path(cfg: DictConfig, callbacks: list[Any]) -> Path | None:
    value = cfg.get("ckpt_path")
    if value is None:
        return None
    if value != "last":
        return Path(str(value))
    path = _last_checkpoint(cfg, callbacks)
    if path is None:
        log.warning(
            "ckpt_path=last: no last.ckpt in %s yet, so training starts anew. To continue "
            "another run, add hydra.run.dir=<its folder> or pass ckpt_path=<its last.ckpt>.",
            Path(cfg.paths.output_dir) / "checkpoints",
        )
    return path


def _check_pretrained_checkpoint(cfg: DictConfig) -> None:
    """``model.checkpoint`` must hold GPT-2 tensors of the configured size: checked from the
    file's header (safetensors) before any data work, with weights.py's named-tensor errors."""
    path = resolve_weights_file(cfg.model.checkpoint)
    with open_tensors(path) as tensors:
        shapes = tensors.shapes()
    layout = _normalise_keys(shapes)
    found = infer_config({k: shapes[orig] for k, orig in layout.items()}, path, strict=False)
    expected = _model_sizes(cfg)
    _check_tensors(path, _hf_plan(expected), shapes, layout, expected, found)


def _expected_shapes(cfg: DictConfig, num_classes: int) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of the classifier this config builds, from a storage-less (meta) model."""
    gpt_cfg = {
        **_model_sizes(cfg),
        "drop_rate": float(cfg.model.get("drop_rate", 0.0)),
        "causal_mask": bool(cfg.model.get("causal_mask", True)),
    }
    with torch.random.fork_rng(devices=[]), torch.device("meta"):  # make_classifier seeds
        model = make_classifier(
            GPTModel(gpt_cfg),
            num_classes=num_classes,
            trainable=cfg.trainable.name,
            rank=cfg.trainable.get("rank", 16),
            alpha=cfg.trainable.get("alpha", 16),
            seed=cfg.seed,
        )
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _sizes_of(shapes: dict[str, tuple[int, ...]]) -> str:
    blocks = {k.split(".")[1] for k in shapes if k.startswith("trf_blocks.")}
    emb, pos = shapes.get("tok_emb.weight", ()), shapes.get("pos_emb.weight", ())
    head = shapes.get("out_head.weight", shapes.get("out_head.linear.weight", ()))
    parts = [f"n_layers={len(blocks)}"]
    if len(emb) == 2:
        parts += [f"emb_dim={emb[1]}", f"vocab_size={emb[0]}"]
    if len(pos) == 2:
        parts.append(f"context_length={pos[0]}")
    if len(head) == 2:
        parts.append(f"{head[0]} classes")
    return ", ".join(parts)


def check_resume_checkpoint(
    cfg: DictConfig,
    path: Path,
    checkpoint: dict[str, Any],
    expected: dict[str, tuple[int, ...]],
) -> None:
    """A resumed checkpoint must be this run's model: same size, class count and trainable
    parameters. One error names expected vs found, instead of Lightning's state-dict traceback."""
    state = checkpoint["state_dict"]
    found = {k.removeprefix("model."): tuple(v.shape) for k, v in state.items() if k.startswith("model.")}
    hparams = checkpoint.get("hyper_parameters") or {}
    lines = []
    if hparams.get("trainable") not in (None, cfg.trainable.name):
        lines.append(
            f"it was trained with trainable={hparams['trainable']}, this run has "
            f"trainable={cfg.trainable.name} (its optimizer state holds other parameters)"
        )
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    wrong = [
        f"{k} expected {list(expected[k])} found {list(found[k])}"
        for k in expected if k in found and found[k] != expected[k]
    ]
    if missing or unexpected or wrong:
        lines.append(f"expected (this run, model={cfg.model.name}): {_sizes_of(expected)}")
        lines.append(f"found (the checkpoint): {_sizes_of(found)}")
        for title, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if names:
                more = f", ... ({len(names) - 5} more)" if len(names) > 5 else ""
                lines.append(f"{title} ({len(names)}): {', '.join(names[:5])}{more}")
    if lines:
        raise CheckpointError(
            f"ckpt_path={path} does not fit this run:\n  " + "\n  ".join(lines)
            + "\n  Resume with the overrides the checkpoint was trained with, or start a new run."
        )


def _known_num_classes(datamodule: Any) -> int | None:
    """The class count if the datamodule knows it before reading data (SMS spam: 2)."""
    try:
        return int(datamodule.num_classes)
    except (AttributeError, TypeError, ValueError):
        return None


def preflight(
    cfg: DictConfig, callbacks: list[Any], num_classes: int | None
) -> tuple[Path | None, dict[str, Any] | None]:
    """Checkpoint checks before any download, tokenizing or training.

    Returns the resolved ``ckpt_path`` and its safely loaded (memory-mapped) contents.
    """
    if cfg.model.weights == "pretrained" and cfg.model.get("checkpoint") is not None:
        _check_pretrained_checkpoint(cfg)
    path = _resolve_ckpt_path(cfg, callbacks)
    if path is None:
        return None, None
    checkpoint = load_checkpoint_safely(path, mmap=True)
    if num_classes is None:  # compare everything but the head now, the head after setup()
        state = checkpoint["state_dict"]
        head = state.get("model.out_head.weight", state.get("model.out_head.linear.weight"))
        num_classes = int(head.shape[0]) if head is not None else 2
    check_resume_checkpoint(cfg, path, checkpoint, _expected_shapes(cfg, num_classes))
    return path, checkpoint


def resume_command(cfg: DictConfig) -> str:
    """The command that continues this run in its own folder from its last checkpoint."""
    try:
        overrides = list(HydraConfig.get().overrides.task)
    except ValueError:  # not running under Hydra
        overrides = []
    keep = [o for o in overrides if not o.startswith(("ckpt_path=", "+ckpt_path="))]
    return shlex.join(
        ["python", "train.py", *keep, f"hydra.run.dir={cfg.paths.output_dir}", "ckpt_path=last"]
    )


def _interrupted(cfg: DictConfig, callbacks: list[Any], trainer: L.Trainer) -> TrainingInterrupted:
    last = _last_checkpoint(cfg, callbacks)
    where = (
        f"The last complete epoch is saved in {last}; work after it is redone on resume."
        if last is not None
        else "No epoch had finished, so no checkpoint exists; resuming starts anew."
    )
    log.error(
        "SIGTERM: stopped at epoch %d, step %d. %s Resume with:\n  %s",
        trainer.current_epoch + 1, trainer.global_step, where, resume_command(cfg),
    )
    return TrainingInterrupted(EXIT_SIGTERM)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one training job; returns the metrics written to ``metrics.json``.

    Everything that can be checked cheaply (config, datamodule options, trainer flags,
    checkpoints) is checked before the data is prepared or the model is built.
    """
    validate_config(cfg)
    datamodule = _instantiate(cfg.data)  # validates its own options; reads nothing yet
    loggers = [_instantiate(c) for c in (cfg.get("logger") or {}).values() if c]
    callbacks = [_instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
    if not loggers:  # nothing to monitor the learning rate into
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    if cfg.trainer.get("enable_progress_bar") is False:  # the flag wins over the callbacks group
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    callbacks.append(RNGState())  # after ModelCheckpoint: resumes continue the same random draws
    trainer: L.Trainer = _instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
        trainer.strategy.checkpoint_io = SafeCheckpointIO()
    ckpt_path, checkpoint = preflight(cfg, callbacks, _known_num_classes(datamodule))

    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True)
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
    if checkpoint is not None:  # the head too, now that the data named the classes
        expected = {
            k.removeprefix("model."): tuple(v.shape)
            for k, v in module.state_dict().items()
            if k.startswith("model.")
        }
        check_resume_checkpoint(cfg, ckpt_path, checkpoint, expected)
        del checkpoint

    start = time.perf_counter()
    try:
        # weights_only: a checkpoint is data, never code (SafeCheckpointIO enforces it as well)
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        wall = time.perf_counter() - start
        module.final_splits = FINAL_SPLITS
        datamodule.setup("test")
        trainer.test(
            module,
            dataloaders=[datamodule.eval_dataloader(s) for s in FINAL_SPLITS],
            verbose=False,
        )
    except SIGTERMException as err:
        raise _interrupted(cfg, callbacks, trainer) from err
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
