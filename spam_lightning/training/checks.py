"""Checks that run before any heavy work (no download, tokenizing or weights): the config and the
checkpoints a run will load. A bad option or checkpoint fails in a second, every problem listed."""

from __future__ import annotations

import inspect
import logging
import math
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.errors import InstantiationException
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig

from spam_lightning.config_keys import unknown_key_problems
from spam_lightning.data.source import DataError
from spam_lightning.model.classifier import make_classifier
from spam_lightning.model.gpt import MODEL_CONFIGS, GPTModel
from spam_lightning.model.weights import CheckpointError, mismatch_lines
from spam_lightning.rules import is_int
from spam_lightning.training.callbacks.checkpoint_io import load_checkpoint_safely
from spam_lightning.training.callbacks.run_config import flat_config, resume_differences

log = logging.getLogger(__name__)

SIZE_KEYS = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers")


class ConfigError(ValueError):
    """A bad option or combination; the message names each option, its value and what is allowed."""


class TokenizerError(RuntimeError):
    """A model's tokenizer cannot be loaded (its files are missing or unreadable)."""


def _is_number(value: Any) -> bool:  # not a bool, not a string such as ``fast``
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def number_problems(node: DictConfig, prefix: str, rules: dict[str, tuple[str, Any]]) -> list[str]:
    """``key -> (what is allowed, test)`` for the keys of ``node`` that are present."""
    return [f"{prefix}{key}={node.get(key)!r}: must be {allowed}"
            for key, (allowed, ok) in rules.items() if key in node and not ok(node.get(key))]


def model_sizes(cfg: DictConfig) -> dict[str, Any]:
    """The model's sizes as configured (the config group's values, overrides included)."""
    m = cfg.model
    return {k: m.get(k, MODEL_CONFIGS.get(m.name, {}).get(k)) for k in (*SIZE_KEYS, "qkv_bias")}


def instantiate(node: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` raising the target's own error, not Hydra's wrapper; a
    constructor refusing an option (``ValueError``, Lightning's) is a ConfigError."""
    try:
        return hydra.utils.instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__  # e.g. trainer.accelerator=gpu on a CPU: a ConfigError
        if isinstance(cause, ValueError | MisconfigurationException) and not isinstance(cause, DataError):
            raise ConfigError(str(cause)) from err
        if isinstance(cause, Exception):
            raise cause from err
        raise ConfigError(str(err)) from err  # e.g. a _target_ that cannot be imported


def validate_config(cfg: DictConfig) -> tuple[Any, Any]:
    """``(family, datamodule)`` built from ``cfg.model`` and ``cfg.data``, before any download or
    tokenizing; every problem of both in one message with the allowed values."""
    family = _family(cfg.model)
    unknown = unknown_key_problems(cfg)  # before anything reads a misspelt key
    problems = unknown + family.problems(cfg) + number_problems(  # IMDB: every split gets examples
        cfg.data, "data.", {"val_size": ("an integer >= 1", lambda v: is_int(v, 1))})
    datamodule = None
    try:
        if not any(p.startswith("data.") for p in unknown):  # a key it does not take
            datamodule = instantiate(cfg.data)  # checks its own options; reads nothing yet
    except ConfigError as err:
        problems.append(str(err))
    except DataError:
        if not problems:
            raise
    if datamodule is not None:  # the class count, where known before the data is read
        try:
            problems += class_weight_problems(cfg, datamodule.num_classes)
        except AttributeError:
            pass
    if problems:
        raise ConfigError("Invalid configuration:\n  - " + "\n  - ".join(problems))
    return family, datamodule


def _family(node: DictConfig) -> Any:
    """``node``'s ``_target_`` built from the keys it takes. A key it does not take (a sweep's
    ``++model.n_layers=2`` across GPT-2 and a baseline) is named in a warning and left out."""
    try:
        params = inspect.signature(hydra.utils.get_class(node._target_)).parameters
    except Exception as err:  # no _target_, or one that cannot be imported
        raise ConfigError(f"model._target_={node.get('_target_')!r}: not a model family ({err})") from err
    unused = [k for k in node if k != "_target_" and k not in params]
    if unused and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        log.warning("model.%s: not an option of %s; ignored", ", model.".join(unused), node._target_)
        node = {"_target_": node._target_, **{k: node[k] for k in node if k in params}}
    return instantiate(node)


def run_problems(cfg: DictConfig) -> list[str]:
    """The options every model trained with Lightning shares, each a clear line instead of a torch
    error (or silent nonsense) after the data is prepared."""
    import os

    from spam_lightning.model.family import FINAL_SPLITS
    from spam_lightning.rules import SEED_RANGE, bool_problems, choice_problems, is_seed

    problems: list[str] = limit_problems(cfg.trainer)
    strategy = cfg.trainer.get("strategy")
    if isinstance(strategy, str) and "spawn" in strategy:
        problems.append(f"trainer.strategy={strategy}: spawned processes keep the final results to "
                        "themselves; use trainer=ddp (strategy=ddp) instead")
    if str(cfg.cache.trunk).lower() not in ("auto", "true", "false"):
        problems.append(f"cache.trunk={cfg.cache.trunk!r}; allowed: auto, true, false")
    devices, cores = cfg.trainer.get("devices"), os.cpu_count() or 1
    on_cpu = cfg.trainer.get("accelerator") == "cpu" or (
        cfg.trainer.get("accelerator") == "auto" and not torch.cuda.is_available())
    if on_cpu and is_int(devices) and devices > max(cores, 2):  # one process each: memory
        problems.append(f"trainer.devices={devices}: more CPU processes than this machine's "
                        f"{cores} cores; use at most {max(cores, 2)}")
    # switches: a string such as `maybe` would count as true
    switches = {f"model.{k}": cfg.model[k] for k in ("compile", "causal_mask", "qkv_bias",
                                                      "gradient_checkpointing") if k in cfg.model}
    problems += bool_problems(**{"cache.shared": cfg.cache.get("shared", True), **switches})
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path is not None and ckpt_path != "last" and not Path(str(ckpt_path)).is_file():
        problems.append(f"ckpt_path={ckpt_path}: no such file; pass a run's checkpoints/last.ckpt, or "
                        "ckpt_path=last with hydra.run.dir=<the run folder>")
    gib = ("a number >= 0 (GiB)", lambda v: _is_number(v) and v >= 0)
    positive = ("a finite number > 0", lambda v: _is_number(v) and v > 0)
    at_least_one = ("an integer >= 1", lambda v: is_int(v, 1))
    t = cfg.trainer
    for node, prefix, rules in (
        (cfg.cache, "cache.", {"memory_budget_gb": gib, "max_gb": gib}),
        (cfg.optimizer, "optimizer.", {
            "lr": positive, "weight_decay": ("a finite number >= 0", lambda v: _is_number(v) and v >= 0)}),
        (cfg.model, "model.", {"drop_rate": ("a number in [0, 1)", lambda v: _is_number(v) and 0 <= v < 1)}),
        (cfg.trainable, "trainable.", {"rank": ("an integer >= 1 for trainable=lora", at_least_one[1]),
                                       "alpha": ("a finite number > 0 for trainable=lora", positive[1])}
         if cfg.trainable.name == "lora" else {}),
        (cfg, "", {"eval_freq": at_least_one, "eval_iter": at_least_one,
                   "seed": (SEED_RANGE, is_seed)}),
        (cfg.get("loss") or {}, "loss.", {
            "ignore_index": ("an integer (a label index never used, e.g. -100)", is_int)}),
        (t, "trainer.", {  # limit_*_batches: Lightning's Trainer refuses bad ones itself
            "max_epochs": ("an integer >= 1, or -1 (no limit, with trainer.max_steps)",
                           lambda v: is_int(v, 1) or (v == -1 and is_int(t.get("max_steps"), 1))),
            "max_steps": ("an integer >= 1, or -1 (no limit)", lambda v: is_int(v, 1) or v == -1),
            "accumulate_grad_batches": at_least_one,
            "check_val_every_n_epoch": ("an integer >= 1, or null",
                                        lambda v: v is None or is_int(v, 1)),
            "min_epochs": ("an integer >= 0, or null", lambda v: v is None or is_int(v, 0)),
            "min_steps": ("an integer >= 0, or null", lambda v: v is None or is_int(v, 0)),
            "num_sanity_val_steps": ("an integer >= 0, or -1 (all)", lambda v: is_int(v, -1)),
            "gradient_clip_val": ("a finite number >= 0, or null",
                                  lambda v: v is None or (_is_number(v) and v >= 0)),
            "val_check_interval": ("an integer >= 1 (batches), a fraction in (0, 1] of an epoch, "
                                   "or null", lambda v: v is None or is_int(v, 1)
                                   or (isinstance(v, float) and 0 < v <= 1))}),
    ):
        problems += number_problems(node, prefix, rules)
    problems += training_option_problems(cfg)
    metrics = [f"{split}_{name}" for split in FINAL_SPLITS  # metrics.json's, per split
               for name in ("accuracy", "loss", "precision", "recall", "f1")]
    problems += choice_problems("optimized_metric", cfg.get("optimized_metric", "val_accuracy"),
                                metrics, " (what train.py returns to an Optuna sweep)")
    return problems


# what the module logs after each validation: what EarlyStopping may monitor, and its mode
VAL_METRICS = {"val/loss": "min", "val/acc": "max", "val/precision": "max", "val/recall": "max",
               "val/f1": "max"}


def _target_class(node: Any) -> Any:
    """The class a ``_target_`` node names, or None (no target, or one that cannot be imported);
    quiet, where ``hydra.utils.get_class`` logs an error."""
    import importlib

    module, _, name = str(node.get("_target_")).rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def training_option_problems(cfg: DictConfig) -> list[str]:
    """The options of issue 26, each off by default: ``optimizer``, ``scheduler``, ``loss.*``,
    ``final_weights`` and an ``EarlyStopping`` among the callbacks. Cheap: nothing is built but
    the scheduler's small settings object."""
    from lightning.pytorch.callbacks import EarlyStopping

    from spam_lightning.rules import choice_problems
    from spam_lightning.training.module import FINAL_WEIGHTS

    problems: list[str] = []
    opt = cfg.get("optimizer")
    if not isinstance(opt, DictConfig) or "_target_" not in opt:
        problems.append("optimizer: must be a _target_ node (optimizer=adamw|sgd, or "
                        "optimizer._target_=torch.optim.CLASS)")
    else:
        target = _target_class(opt)
        if not (isinstance(target, type) and issubclass(target, torch.optim.Optimizer)):
            problems.append(f"optimizer._target_={opt._target_}: not a torch.optim.Optimizer class "
                            "(e.g. torch.optim.AdamW, torch.optim.SGD, torch.optim.RMSprop)")
        if opt.get("_partial_") is not True:
            problems.append(f"optimizer._partial_={opt.get('_partial_')!r}: must be true (the "
                            "trainable parameters are passed when the optimizer is built)")
    if (sched := cfg.get("scheduler")) is not None:
        try:
            problems += instantiate(sched).problems()
        except (ConfigError, TypeError, AttributeError) as err:
            problems.append(f"scheduler: {err} (choose one with scheduler=none|linear_warmup|cosine)")
    loss = cfg.get("loss") or {}
    smoothing = loss.get("label_smoothing", 0.0)
    if not (_is_number(smoothing) and 0 <= smoothing < 1):
        problems.append(f"loss.label_smoothing={smoothing!r}: must be a number in [0, 1) "
                        "(0.0: none, the chapter)")
    weights = loss.get("class_weights")
    if weights is not None and weights != "balanced":
        values = list(weights) if not isinstance(weights, str | int | float) else None
        if not values or not all(_is_number(w) and w >= 0 for w in values) or not any(values):
            problems.append(f"loss.class_weights={weights!r}: must be null, balanced, or a list of "
                            "one number >= 0 per class (not all 0), e.g. [1.0, 3.0]")
    final = cfg.get("final_weights", "last")
    problems += choice_problems("final_weights", final, FINAL_WEIGHTS)
    callbacks = {k: c for k, c in (cfg.get("callbacks") or {}).items() if isinstance(c, DictConfig)}
    if final == "best" and not any(
            "monitor" in c and c.monitor and isinstance(cls := _target_class(c), type)
            and issubclass(cls, ModelCheckpoint) for c in callbacks.values()):
        problems.append("final_weights=best needs a checkpoint callback that keeps the best epoch "
                        "(callbacks=default or early_stopping: model_checkpoint, on val/acc)")
    if final == "best" and "fsdp" in str(cfg.trainer.get("strategy")).lower():
        problems.append("final_weights=best loads a whole checkpoint into the model: not with "
                        "trainer=fsdp (sharded); use final_weights=last")
    no_validation = cfg.trainer.get("limit_val_batches") == 0
    for name, node in callbacks.items():
        if not (isinstance(cls := _target_class(node), type) and issubclass(cls, EarlyStopping)):
            continue
        where, monitor, mode = f"callbacks.{name}", node.get("monitor"), node.get("mode", "min")
        if monitor not in VAL_METRICS:
            problems.append(f"{where}.monitor={monitor!r} is not logged; allowed: "
                            f"{', '.join(VAL_METRICS)}")
        elif mode != VAL_METRICS[monitor]:
            problems.append(f"{where}.mode={mode!r}: {monitor} improves when it goes "
                            f"{'down' if VAL_METRICS[monitor] == 'min' else 'up'}; use "
                            f"{where}.mode={VAL_METRICS[monitor]}")
        problems += number_problems(node, f"{where}.", {
            "patience": ("an integer >= 1 (validations without improvement)", lambda v: is_int(v, 1)),
            "min_delta": ("a finite number >= 0", lambda v: _is_number(v) and v >= 0)})
        if no_validation:
            problems.append(f"{where} monitors {monitor}, but trainer.limit_val_batches=0 runs no "
                            "validation; allow validation batches or drop early stopping")
    return problems


def class_weight_problems(cfg: DictConfig, num_classes: int | None) -> list[str]:
    """``loss.class_weights`` as a list: one weight per class, where the class count is known
    before the data is read (SMS spam: 2; a CSV with ``data.class_names``)."""
    weights = (cfg.get("loss") or {}).get("class_weights")
    if num_classes is None or weights is None or isinstance(weights, str | int | float):
        return []
    if len(weights) == num_classes:
        return []
    return [f"loss.class_weights={list(weights)}: {len(weights)} weights, but the data has "
            f"{num_classes} classes; give one weight per class, or balanced, or null"]


# limit_*_batches=0 that Lightning accepts but that break the run's results
EMPTY_LIMITS = {
    "limit_train_batches": "trains nothing: the run would bundle the untrained model",
    "limit_test_batches": "leaves the final evaluation (metrics.json) without batches",
}


def limit_problems(trainer: DictConfig) -> list[str]:
    """``trainer.limit_train_batches=0`` and its siblings that would give results of nothing
    (``limit_val_batches=0`` only turns Lightning's validation off: allowed)."""
    return [f"trainer.{key}={trainer.get(key)!r} {why}; use a number of batches >= 1 or a "
            f"fraction in (0, 1] (debug=limit runs a few batches of each)"
            for key, why in EMPTY_LIMITS.items()
            if _is_number(trainer.get(key)) and trainer.get(key) == 0]


def last_checkpoint(cfg: DictConfig, callbacks: list[Any]) -> Path | None:
    """What ``ckpt_path=last`` means (as in Lightning): the newest ``last*.ckpt`` of the
    ModelCheckpoint folders, or None before the first epoch-end checkpoint."""
    folders = {Path(cb.dirpath or Path(cfg.paths.output_dir) / "checkpoints")
               for cb in callbacks if isinstance(cb, ModelCheckpoint)}
    found = [p for folder in folders for p in folder.glob("last*.ckpt")
             if p.stem == "last" or p.stem.removeprefix("last-").isdigit()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def classifier_options(cfg: DictConfig) -> dict[str, Any]:
    """``make_classifier``'s ``trainable`` (LoRA: ``rank``, ``alpha``) as configured."""
    t = cfg.trainable
    return {"trainable": t.name, **({"rank": t.rank, "alpha": t.alpha} if t.name == "lora" else {})}


def _expected_shapes(cfg: DictConfig, num_classes: int) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of the classifier this config builds, from a storage-less (meta) model."""
    gpt_cfg = {**model_sizes(cfg), "drop_rate": float(cfg.model.get("drop_rate", 0.0)),
               "causal_mask": bool(cfg.model.get("causal_mask", True))}
    with torch.random.fork_rng(devices=[]), torch.device("meta"):  # make_classifier seeds
        model = make_classifier(GPTModel(gpt_cfg), num_classes=num_classes, seed=cfg.seed, **classifier_options(cfg))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _sizes_of(shapes: dict[str, tuple[int, ...]]) -> str:
    blocks = {k.split(".")[1] for k in shapes if k.startswith("trf_blocks.")}
    emb, pos = shapes.get("tok_emb.weight", ()), shapes.get("pos_emb.weight", ())
    head = shapes.get("out_head.weight", shapes.get("out_head.linear.weight", ()))
    parts = [f"n_layers={len(blocks)}", *([f"emb_dim={emb[1]}", f"vocab_size={emb[0]}"] if len(emb) == 2 else []),
             *([f"context_length={pos[0]}"] if len(pos) == 2 else []), *([f"{head[0]} classes"] if len(head) == 2 else [])]
    return ", ".join(parts)


def check_resume_checkpoint(cfg: DictConfig, path: Path, checkpoint: dict[str, Any],
                            expected: dict[str, tuple[int, ...]]) -> None:
    """A resumed checkpoint must be this run's model: same size, class count and trainable
    parameters. One error names expected vs found, instead of Lightning's state-dict traceback."""
    state = checkpoint["state_dict"]
    shapes = {**{k: v.shape for k, v in state.items()}, **(checkpoint.get("frozen_base") or {}).get("shapes", {})}
    found = {k.removeprefix("model."): tuple(v) for k, v in shapes.items() if k.startswith("model.")}
    hparams = checkpoint.get("hyper_parameters") or {}
    lines = []
    if hparams.get("trainable") not in (None, cfg.trainable.name):
        lines.append(f"it was trained with trainable={hparams['trainable']}, this run has "
                     f"trainable={cfg.trainable.name} (its optimizer state holds other parameters)")
    if problems := mismatch_lines(expected, found, most=5):
        lines += [f"expected (this run, model={cfg.model.name}): {_sizes_of(expected)}",
                  f"found (the checkpoint): {_sizes_of(found)}", *problems]
    if lines:
        raise CheckpointError(f"ckpt_path={path} does not fit this run:\n  " + "\n  ".join(lines)
                              + "\n  Resume with the overrides the checkpoint was trained with, or start a new run.")


def preflight(cfg: DictConfig, family: Any, callbacks: list[Any],
              num_classes: int | None) -> tuple[Path | None, dict[str, Any] | None]:
    """Weights, tokenizer and checkpoint checks before any work: the resolved ``ckpt_path`` and its
    safely loaded (memory-mapped) contents. A resume continues the same run: a setting that
    differs from the checkpoint's and could change what is trained or measured is refused."""
    family.preflight(cfg)
    if (value := cfg.get("ckpt_path")) is None:
        return None, None
    path = Path(str(value)) if value != "last" else last_checkpoint(cfg, callbacks)
    if path is None:
        log.warning("ckpt_path=last: no last.ckpt in %s yet, so training starts anew. To continue "
                    "another run, add hydra.run.dir=<its folder> or pass ckpt_path=<its "
                    "last.ckpt>.",
                    Path(cfg.paths.output_dir) / "checkpoints")
        return None, None
    checkpoint = load_checkpoint_safely(path, mmap=True)
    _compare_settings(cfg, path, checkpoint)
    family.check_resume(cfg, path, checkpoint, num_classes)
    return path, checkpoint


def _compare_settings(cfg: DictConfig, path: Path, checkpoint: dict[str, Any]) -> None:
    """Refuse a resume whose settings differ from those its checkpoint recorded (paths under
    either run folder may differ: a run continued in another folder)."""
    saved = ((checkpoint.get("callbacks") or {}).get("RunConfig") or {}).get("config")
    if not isinstance(saved, dict):  # a checkpoint from before configs were recorded
        log.warning("ckpt_path=%s records no run config: the overrides cannot be compared", path)
    elif lines := resume_differences(saved, flat_config(cfg)):
        raise ConfigError(f"ckpt_path={path} continues a run trained with other settings, which a resume would "
                          "partly ignore:\n  " + "\n  ".join(lines) + "\n  Resume with the run's own settings "
                          "(its config.yaml), or start a new run in another folder.")


def check_resume_settings(cfg: DictConfig) -> None:
    """``preflight``'s settings comparison alone, for the run folder's guard (before Hydra
    writes into the folder): ``ckpt_path`` resolved as Lightning resolves it."""
    value = cfg.get("ckpt_path")
    if value is None:
        return
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
    path = Path(str(value)) if value != "last" else last_checkpoint(cfg, callbacks)
    if path is not None and path.is_file():
        _compare_settings(cfg, path, load_checkpoint_safely(path, mmap=True))
