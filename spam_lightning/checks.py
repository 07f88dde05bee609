"""Checks that run before any heavy work: the config, and the checkpoints a run will load.

Everything here is cheap (no download, no tokenizing, no model weights): a bad option or a
mismatched checkpoint fails in a second with one message that lists every problem.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig

from spam_lightning.callbacks import load_checkpoint_safely
from spam_lightning.classifier import TOKENS, TRAINABLE, make_classifier
from spam_lightning.data.tokens import PADDING_MODES
from spam_lightning.model import MODEL_CONFIGS, GPTModel
from spam_lightning.weights import HUB_REPOS, CheckpointError, check_checkpoint

log = logging.getLogger(__name__)

SIZE_KEYS = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers")


def _is_int(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def model_sizes(cfg: DictConfig) -> dict[str, Any]:
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
    problems += _data_problems(cfg.data, sizes["context_length"])
    strategy = cfg.trainer.get("strategy")
    if isinstance(strategy, str) and "spawn" in strategy:
        problems.append(
            f"trainer.strategy={strategy}: spawned processes keep the final results to "
            "themselves; use trainer=ddp (strategy=ddp) instead"
        )
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


def _check_pretrained_checkpoint(cfg: DictConfig) -> None:
    """``model.checkpoint`` must hold GPT-2 tensors of the configured size: checked from the
    file's header (safetensors) before any data work, with weights.py's named-tensor errors."""
    check_checkpoint(cfg.model.checkpoint, model_sizes(cfg))


def _expected_shapes(cfg: DictConfig, num_classes: int) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of the classifier this config builds, from a storage-less (meta) model."""
    gpt_cfg = {
        **model_sizes(cfg),
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


def known_num_classes(datamodule: Any) -> int | None:
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
