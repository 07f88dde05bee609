"""Checks that run before any heavy work: the config, and the checkpoints a run will load.

Everything here is cheap (no download, no tokenizing, no model weights): a bad option or a
mismatched checkpoint fails in a second with one message that lists every problem.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig

from spam_lightning.data.table import SPLIT_PROCEDURES
from spam_lightning.data.tokens import PADDING_MODES, get_tokenizer
from spam_lightning.model.classifier import TRAINABLE, make_classifier
from spam_lightning.model.gpt import MODEL_CONFIGS, GPTModel
from spam_lightning.model.pooling import pooling_names
from spam_lightning.model.weights import (
    HUB_REPOS,
    CheckpointError,
    check_checkpoint,
    check_weights_available,
    mismatch_lines,
)
from spam_lightning.training.callbacks.checkpoint_io import load_checkpoint_safely
from spam_lightning.training.callbacks.run_config import flat_config, resume_differences

log = logging.getLogger(__name__)

SIZE_KEYS = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers")


class ConfigError(ValueError):
    """A bad option or an impossible combination; the message names each option, its value and
    what is allowed."""


class TokenizerError(RuntimeError):
    """The GPT-2 tokenizer cannot be loaded (its files are missing or unreadable)."""


def _is_int(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _is_number(value: Any) -> bool:
    """A finite int or float (not a bool, not a string such as ``fast``)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _number_problems(node: DictConfig, prefix: str, rules: dict[str, tuple[str, Any]]) -> list[str]:
    """``key -> (what is allowed, test)`` for the keys of ``node`` that are present."""
    problems = []
    for key, (allowed, ok) in rules.items():
        if key in node and not ok(node.get(key)):
            problems.append(f"{prefix}{key}={node.get(key)!r}: must be {allowed}")
    return problems


def model_sizes(cfg: DictConfig) -> dict[str, Any]:
    """The model's sizes as configured (the config group's values, overrides included)."""
    m = cfg.model
    return {k: m.get(k, MODEL_CONFIGS.get(m.name, {}).get(k)) for k in (*SIZE_KEYS, "qkv_bias")}


MODEL_KINDS = ("gpt2", "encoder", "baseline")


def model_kind(cfg: DictConfig) -> str:
    """``model.kind``: ``gpt2`` (the chapter's GPTModel; the default), ``encoder`` (transformers'
    AutoModelForSequenceClassification) or ``baseline`` (majority / logistic regression)."""
    return str(cfg.model.get("kind") or "gpt2")


def validate_config(cfg: DictConfig) -> None:
    """Fail on bad names and impossible combinations before any download or tokenizing.

    Every problem is listed at once, with the allowed values, so one run shows them all.
    """
    kind = model_kind(cfg)
    if kind == "gpt2":
        problems = _gpt2_problems(cfg)
    elif kind == "encoder":
        problems = _encoder_problems(cfg)
    elif kind == "baseline":
        problems = _baseline_problems(cfg)
    else:
        problems = [f"model.kind={kind!r}; allowed: {', '.join(MODEL_KINDS)}"]
    if kind != "baseline":
        problems += _run_problems(cfg)
    if problems:
        raise ConfigError("Invalid configuration:\n  - " + "\n  - ".join(problems))


def _encoder_problems(cfg: DictConfig) -> list[str]:
    from spam_lightning.model.encoder import ENCODER_TRAINABLE

    m, problems = cfg.model, []
    if importlib.util.find_spec("transformers") is None:
        problems.append('model.kind=encoder needs transformers: pip install -e ".[hf]"')
    if not isinstance(m.get("name"), str) or not m.name.strip():
        problems.append(f"model.name={m.get('name')!r}: a Hub id or a local save_pretrained folder")
    if m.get("weights") not in ("pretrained", "random"):
        problems.append(f"model.weights={m.get('weights')!r}; allowed: pretrained, random")
    if cfg.trainable.name not in ENCODER_TRAINABLE:
        problems.append(
            f"trainable.name={cfg.trainable.name!r} is not for encoders; allowed with "
            f"model=encoder: {', '.join(ENCODER_TRAINABLE)} (choose one with trainable=NAME)"
        )
    if not _is_int(m.get("context_length"), 1):
        problems.append(f"model.context_length={m.get('context_length')!r}: must be an integer >= 1")
    if cfg.token.name != "last":  # each family pools its own way (BERT: the [CLS] token)
        problems.append(
            f"token={cfg.token.name}: the token option is GPT-2's; an encoder pools as its "
            "family does (drop the token override)"
        )
    if str(cfg.cache.trunk).lower() == "true":
        problems.append("cache.trunk=true: the frozen-trunk cache is GPT-2's; use cache.trunk=auto")
    return problems + _training_problems(cfg) + _data_problems(cfg.data, m.get("context_length"))


def _baseline_problems(cfg: DictConfig) -> list[str]:
    from spam_lightning.model.baselines import BASELINES, FEATURES

    m, problems = cfg.model, []
    if importlib.util.find_spec("sklearn") is None:
        problems.append(f'model={m.get("name")} needs scikit-learn: pip install -e ".[baselines]"')
    if m.get("name") not in BASELINES:
        problems.append(f"model.name={m.get('name')!r}; allowed with model.kind=baseline: {', '.join(BASELINES)}")
    if m.get("features") not in FEATURES:
        problems.append(f"model.features={m.get('features')!r}; allowed: {', '.join(FEATURES)}")
    if not _is_int(m.get("max_iter"), 1):
        problems.append(f"model.max_iter={m.get('max_iter')!r}: must be an integer >= 1")
    if cfg.get("ckpt_path") is not None:
        problems.append(
            f"ckpt_path={cfg.ckpt_path}: model.kind=baseline fits in one step and writes no "
            "checkpoints; rerun without ckpt_path"
        )
    problems += _number_problems(cfg, "", {"seed": ("an integer >= 0", lambda v: _is_int(v, 0))})
    return problems + _data_problems(cfg.data, m.get("context_length"))


def _gpt2_problems(cfg: DictConfig) -> list[str]:
    """The chapter's GPTModel: a known size, trainable and token choices, weights."""
    problems: list[str] = []
    m = cfg.model
    if m.name not in MODEL_CONFIGS:
        problems.append(
            f"model.name={m.name!r} is unknown; allowed: {', '.join(MODEL_CONFIGS)} "
            "(choose one with model=NAME)"
        )
    if m.weights not in ("pretrained", "random"):
        problems.append(f"model.weights={m.weights!r}; allowed: pretrained, random")
    for group, allowed in (("trainable", TRAINABLE), ("token", pooling_names(cfg.token))):
        if cfg[group].name not in allowed:
            problems.append(
                f"{group}.name={cfg[group].name!r} is unknown; allowed: {', '.join(allowed)} "
                f"(choose one with {group}=NAME)"
            )
    sizes = model_sizes(cfg)
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
    problems += _training_problems(cfg)
    return problems + _data_problems(cfg.data, sizes["context_length"])


def _run_problems(cfg: DictConfig) -> list[str]:
    """Trainer strategy, trunk cache and resume path: shared by every trained model."""
    problems: list[str] = []
    strategy = cfg.trainer.get("strategy")
    if isinstance(strategy, str) and "spawn" in strategy:
        problems.append(
            f"trainer.strategy={strategy}: spawned processes keep the final results to "
            "themselves; use trainer=ddp (strategy=ddp) instead"
        )
    if str(cfg.cache.trunk).lower() not in ("auto", "true", "false"):
        problems.append(f"cache.trunk={cfg.cache.trunk!r}; allowed: auto, true, false")
    gib = ("a number >= 0 (GiB)", lambda v: _is_number(v) and v >= 0)
    problems += _number_problems(cfg.cache, "cache.", {"memory_budget_gb": gib, "max_gb": gib})
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path is not None and ckpt_path != "last" and not Path(str(ckpt_path)).is_file():
        problems.append(
            f"ckpt_path={ckpt_path}: no such file; pass a run's checkpoints/last.ckpt, or "
            "ckpt_path=last with hydra.run.dir=<the run folder>"
        )
    return problems


def _training_problems(cfg: DictConfig) -> list[str]:
    """Optimizer, dropout, LoRA, monitoring and trainer numbers: each a clear line instead of a
    torch error (or silent nonsense) after the data is prepared."""
    positive = ("a finite number > 0", lambda v: _is_number(v) and v > 0)
    non_negative = ("a finite number >= 0", lambda v: _is_number(v) and v >= 0)
    problems = _number_problems(cfg.optimizer, "optimizer.", {"lr": positive, "weight_decay": non_negative})
    problems += _number_problems(
        cfg.model, "model.", {"drop_rate": ("a number in [0, 1)", lambda v: _is_number(v) and 0 <= v < 1)})
    if cfg.trainable.name == "lora":
        for key, allowed, ok in (
            ("rank", "an integer >= 1", lambda v: _is_int(v, 1)),
            ("alpha", "a finite number > 0", positive[1]),
        ):
            value = cfg.trainable.get(key)
            if not ok(value):
                problems.append(f"trainable.{key}={value!r}: must be {allowed} for trainable=lora")
    at_least_one = ("an integer >= 1", lambda v: _is_int(v, 1))
    problems += _number_problems(cfg, "", {"eval_freq": at_least_one, "eval_iter": at_least_one,
                                           "seed": ("an integer >= 0", lambda v: _is_int(v, 0))})
    t = cfg.trainer
    problems += _number_problems(
        t,
        "trainer.",
        {
            "max_epochs": (
                "an integer >= 1, or -1 (no limit, with trainer.max_steps)",
                lambda v: _is_int(v, 1) or (v == -1 and _is_int(t.get("max_steps"), 1)),
            ),
            "max_steps": ("an integer >= 1, or -1 (no limit)", lambda v: _is_int(v, 1) or v == -1),
            "accumulate_grad_batches": at_least_one,
            "check_val_every_n_epoch": ("an integer >= 1, or null", lambda v: v is None or _is_int(v, 1)),
            **{
                f"limit_{split}_batches": (
                    "null, an integer >= 0 (batches) or a fraction in [0, 1]",
                    lambda v: v is None or _is_int(v, 0) or (isinstance(v, float) and 0 <= v <= 1),
                )
                for split in ("train", "val", "test")
            },
        },
    )
    return problems


def _pretrained_problems(cfg: DictConfig, sizes: dict[str, Any]) -> list[str]:
    """Pretrained weights exist only for the released sizes (or a given checkpoint)."""
    m = cfg.model
    checkpoint = m.get("checkpoint")
    if checkpoint is not None:
        path = Path(str(checkpoint)).expanduser()
        return [] if path.exists() else [f"model.checkpoint={checkpoint}: no such file or folder"]
    if m.name not in HUB_REPOS:
        return [f"model {m.name} has no pretrained weights; use model.weights=random or "
                "model.checkpoint=/path/to/model.safetensors"]
    released = MODEL_CONFIGS[m.name]
    differ = [k for k in SIZE_KEYS if sizes[k] != released[k]]
    return [] if not differ else [
        f"pretrained {m.name} has {', '.join(f'{k}={released[k]}' for k in differ)}, but the "
        f"config asks for {', '.join(f'{k}={sizes[k]}' for k in differ)}; other sizes need "
        "model.weights=random or a model.checkpoint of that size"
    ]


def _data_problems(d: DictConfig, context_length: Any) -> list[str]:
    """The loader options every datamodule shares (its ``__init__`` checks them again)."""
    batch_size, padding, max_length = d.get("batch_size"), d.get("padding"), d.get("max_length")
    problems = _number_problems(d, "data.", {
        "batch_size": ("an integer >= 1", lambda v: _is_int(v, 1)),
        "num_workers": ("an integer >= 0", lambda v: _is_int(v, 0)),
    })
    if "padding" in d and padding not in PADDING_MODES:
        problems.append(f"data.padding={padding!r}; allowed: {', '.join(PADDING_MODES)}")
    if "split" in d and d.get("split") not in SPLIT_PROCEDURES:  # the SMS data only
        problems.append(f"data.split={d.get('split')!r}; allowed: {', '.join(SPLIT_PROCEDURES)}")
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
    return problems + _split_problems(d)


def _split_problems(d: DictConfig) -> list[str]:
    """Split fractions (``data.source`` split into train / validation / rest) and split sizes
    (IMDB): every split must get examples."""
    fraction = ("a number in (0, 1)", lambda v: _is_number(v) and 0 < v < 1)
    problems = _number_problems(d, "data.", {"train_frac": fraction, "val_frac": fraction})
    train_frac, val_frac = d.get("train_frac"), d.get("val_frac")
    if not problems and _is_number(train_frac) and _is_number(val_frac) and train_frac + val_frac >= 1:
        problems.append(
            f"data.train_frac={train_frac} + data.val_frac={val_frac} = {train_frac + val_frac:g}: "
            "must be < 1 (the rest is the test split)"
        )
    at_least_one = ("an integer >= 1", lambda v: _is_int(v, 1))
    rest = ("null (the rest) or an integer >= 1", lambda v: v is None or _is_int(v, 1))
    return problems + _number_problems(
        d, "data.", {"train_size": at_least_one, "val_size": at_least_one, "test_size": rest})


def last_checkpoint(cfg: DictConfig, callbacks: list[Any]) -> Path | None:
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
    path = last_checkpoint(cfg, callbacks)
    if path is None:
        log.warning(
            "ckpt_path=last: no last.ckpt in %s yet, so training starts anew. To continue "
            "another run, add hydra.run.dir=<its folder> or pass ckpt_path=<its last.ckpt>.",
            Path(cfg.paths.output_dir) / "checkpoints",
        )
    return path


def classifier_options(cfg: DictConfig) -> dict[str, Any]:
    """``make_classifier``'s ``trainable`` (and, for LoRA, ``rank`` and ``alpha``) exactly as
    configured: validate_config has checked them, nothing falls back to a default."""
    options: dict[str, Any] = {"trainable": cfg.trainable.name}
    if cfg.trainable.name == "lora":
        options.update(rank=cfg.trainable.rank, alpha=cfg.trainable.alpha)
    return options


def _expected_shapes(cfg: DictConfig, num_classes: int) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of the classifier this config builds, from a storage-less (meta) model."""
    gpt_cfg = {**model_sizes(cfg), "drop_rate": float(cfg.model.get("drop_rate", 0.0)),
               "causal_mask": bool(cfg.model.get("causal_mask", True))}
    with torch.random.fork_rng(devices=[]), torch.device("meta"):  # make_classifier seeds
        model = make_classifier(
            GPTModel(gpt_cfg), num_classes=num_classes, seed=cfg.seed, **classifier_options(cfg)
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
    cfg: DictConfig, path: Path, checkpoint: dict[str, Any], expected: dict[str, tuple[int, ...]],
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
    problems = mismatch_lines(expected, found, most=5)
    if problems:
        lines.append(f"expected (this run, model={cfg.model.name}): {_sizes_of(expected)}")
        lines.append(f"found (the checkpoint): {_sizes_of(found)}")
        lines += problems
    if lines:
        raise CheckpointError(
            f"ckpt_path={path} does not fit this run:\n  " + "\n  ".join(lines)
            + "\n  Resume with the overrides the checkpoint was trained with, or start a new run."
        )


def check_resume_config(cfg: DictConfig, path: Path, checkpoint: dict[str, Any]) -> None:
    """A resume continues the same run: refuse any setting that differs from the checkpoint's
    run and could change what is trained or measured (``run_config.MAY_DIFFER`` lists those
    that may: logging, progress, paths, how long to train, workers, the exact trunk cache)."""
    saved = ((checkpoint.get("callbacks") or {}).get("RunConfig") or {}).get("config")
    if not isinstance(saved, dict):  # a checkpoint from before configs were recorded
        log.warning("ckpt_path=%s records no run config: the overrides cannot be compared", path)
        return
    lines = resume_differences(saved, flat_config(cfg))
    if lines:
        raise ConfigError(
            f"ckpt_path={path} continues a run trained with other settings, which a resume "
            f"would partly ignore:\n  " + "\n  ".join(lines) + "\n  Resume with the run's own "
            "settings (its config.yaml), or start a new run in another folder."
        )


def known_num_classes(datamodule: Any) -> int | None:
    """The class count if the datamodule knows it before reading data (SMS spam: 2)."""
    try:
        return int(datamodule.num_classes)
    except (AttributeError, TypeError, ValueError):
        return None


def check_tokenizer() -> None:
    """Load the GPT-2 tokenizer now (it is cached per process), so a missing or damaged
    tokenizer fails before the data is prepared, with its own message."""
    try:
        get_tokenizer()
    except (RuntimeError, OSError) as err:  # what loading its files raises (DataError passes)
        raise TokenizerError(str(err)) from err


def preflight(
    cfg: DictConfig, callbacks: list[Any], num_classes: int | None
) -> tuple[Path | None, dict[str, Any] | None]:
    """Checkpoint, weights and tokenizer checks before any download, tokenizing or training.

    Returns the resolved ``ckpt_path`` and its safely loaded (memory-mapped) contents.
    """
    kind = model_kind(cfg)
    if kind == "encoder":
        from spam_lightning.model.encoder import check_encoder_available

        check_encoder_available(cfg.model.name, cfg.model.weights)
    elif cfg.model.weights == "pretrained":
        if cfg.model.get("checkpoint") is not None:  # its header: GPT-2 of the configured size?
            check_checkpoint(cfg.model.checkpoint, model_sizes(cfg))
        else:  # cache or a quick Hub check, before minutes of data work and tokenizing
            check_weights_available(cfg.model.name)
    if kind == "gpt2":
        check_tokenizer()
    path = _resolve_ckpt_path(cfg, callbacks)
    if path is None:
        return None, None
    checkpoint = load_checkpoint_safely(path, mmap=True)
    check_resume_config(cfg, path, checkpoint)
    if kind != "gpt2":  # its shapes are compared once the model is built
        return path, checkpoint
    if num_classes is None:  # compare everything but the head now, the head after setup()
        state = checkpoint["state_dict"]
        head = state.get("model.out_head.weight", state.get("model.out_head.linear.weight"))
        num_classes = int(head.shape[0]) if head is not None else 2
    check_resume_checkpoint(cfg, path, checkpoint, _expected_shapes(cfg, num_classes))
    return path, checkpoint
