"""The GPT-2 family (``conf/model/gpt2-*.yaml``): the book's GPTModel (``model/gpt.py``) with
pretrained, checkpoint or random weights, turned into a classifier per ``trainable`` and
``token``, trained with the frozen-trunk cache, bundled as safetensors (``inference/bundle.py``).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from spam_lightning.model.classifier import (
    TRAINABLE,
    GPTClassifier,
    first_trainable_block,
    make_classifier,
)
from spam_lightning.model.family import Fitted, ModelFamily, Predictor
from spam_lightning.model.pooling import get_pooling, pooling_names
from spam_lightning.model.sizes import CFG_KEYS, HUB_REPOS, MODEL_CONFIGS
from spam_lightning.model.weights import build_gpt, cached_weights, weights_problems
from spam_lightning.rules import choice_problems, is_int

# training code (Lightning, Hydra) is imported inside the methods: inference loads this module

log = logging.getLogger(__name__)


def build_model(cfg: DictConfig, num_classes: int) -> GPTClassifier:
    """GPT-2 (pretrained, a checkpoint or random) as a classifier per ``trainable`` and ``token``."""
    from spam_lightning.training.checks import classifier_options, model_sizes

    m = cfg.model
    torch.manual_seed(cfg.seed)  # random weights are reproducible too
    sizes = {k: v for k, v in model_sizes(cfg).items() if k in CFG_KEYS}
    # the config's sizes, so e.g. model.n_layers=1 builds what the checks checked
    model = build_gpt(m.name, weights=m.weights, checkpoint=m.checkpoint,
                      causal_mask=m.causal_mask, drop_rate=m.drop_rate, **sizes)
    model = make_classifier(model, num_classes=num_classes, seed=cfg.seed, **classifier_options(cfg))
    if m.get("compile", False):
        for block in model.trf_blocks:
            block.compile(dynamic=True)
    classifier = GPTClassifier(model, token=cfg.token)
    classifier.gradient_checkpointing = bool(m.get("gradient_checkpointing", False))
    return classifier


def base_classifier(config: dict[str, Any], weights: str | None = None) -> GPTClassifier:
    """The classifier a bundle that keeps only its trained tensors was trained as, on its base
    rebuilt from ``bundle.json``'s ``base`` (``weights="random"`` under ``torch.device("meta")``:
    the shapes only). The random init is seeded as ``build_model`` seeds it."""
    base, m = config["base"], config["model"]
    weights = weights or ("random" if base["source"] == "random" else "pretrained")
    path = base.get("path") if weights == "pretrained" else None
    torch.manual_seed(int(base.get("seed", 0)))
    gpt = build_gpt(base["name"], weights=weights, checkpoint=path, causal_mask=m.get("causal_mask", True),
                    **{k: m[k] for k in CFG_KEYS})
    return make_classifier(gpt, num_classes=config["num_classes"], seed=int(base.get("seed", 0)),
                           **base["classifier"])


GPT2_VOCAB = 50257  # the GPT-2 tokenizer's ids are 0 .. 50256


def _size_problems(sizes: dict[str, Any], pad_token_id: Any) -> list[str]:
    """Sizes the embedding or the machine cannot take: a vocabulary without GPT-2's token ids or
    the pad id (an IndexError mid-training), or weights larger than this machine's memory."""
    import os

    vocab, emb, problems = sizes["vocab_size"], sizes["emb_dim"], []
    if vocab < GPT2_VOCAB:
        problems.append(f"model.vocab_size={vocab}: must be >= {GPT2_VOCAB} (the GPT-2 tokenizer's "
                        f"token ids go up to {GPT2_VOCAB - 1})")
    elif is_int(pad_token_id) and pad_token_id >= vocab:
        problems.append(f"data.pad_token_id={pad_token_id}: must be < model.vocab_size={vocab} "
                        f"(an embedding row; GPT-2 pads with 50256)")
    params = (2 * vocab + sizes["context_length"]) * emb + 12 * sizes["n_layers"] * emb * emb
    with contextlib.suppress(ValueError, OSError, AttributeError):  # no sysconf: no check
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        if 4 * params > memory:
            problems.append(
                f"model sizes (vocab_size={vocab}, context_length={sizes['context_length']}, "
                f"emb_dim={emb}, n_layers={sizes['n_layers']}) give about {params:.3g} parameters, "
                f"{4 * params / 2**30:,.0f} GiB in fp32: more than this machine's "
                f"{memory / 2**30:,.0f} GiB of memory; use smaller model sizes")
    return problems


class TrunkCachedFamily(ModelFamily):
    """A GPTClassifier family (GPT-2, the decoders): trained with the frozen-trunk cache, pooled
    per ``token``."""

    def callbacks(self, cfg: DictConfig, model: GPTClassifier, datamodule: Any) -> list[Any]:
        from spam_lightning.training.callbacks import TrunkCaching

        start = first_trainable_block(cfg.trainable.name, len(model.trf_blocks))
        self._caching = TrunkCaching(start, datamodule, **cfg.cache)
        return [self._caching]

    def fit(self, cfg: DictConfig, trainer: Any, datamodule: Any, ckpt_path: Path | None,
            checkpoint: dict | None) -> Fitted:
        fitted = super().fit(cfg, trainer, datamodule, ckpt_path, checkpoint)
        cached = {k: v for k, v in self._caching.seconds.items() if k in ("train", "val")}
        total, cache_seconds = fitted.training_seconds, sum(cached.values())
        log.info("Training took %.1f s: frozen-trunk cache %.1f s (%s), epochs and evaluations %.1f s.",
                 total, cache_seconds, ", ".join(f"{k} {v:.1f} s" for k, v in cached.items()) or "none",
                 total - cache_seconds)
        return fitted

    def trunk_cached(self) -> bool:
        return self._caching.active

    def recorded(self, cfg: DictConfig) -> dict[str, Any]:
        return {**super().recorded(cfg), "token": cfg.token.name}


@dataclass
class GPT2Family(TrunkCachedFamily):
    """The chapter's model. Options: ``conf/model/gpt2-small.yaml``."""

    kind = "gpt2"
    plain_options = {"weights": "random", "checkpoint": None, "compile": False,
                     "gradient_checkpointing": False}
    name: str = "gpt2-small"
    weights: str = "pretrained"
    checkpoint: str | None = None
    causal_mask: bool = True
    compile: bool = False
    gradient_checkpointing: bool = False
    vocab_size: Any = None
    context_length: Any = None
    emb_dim: Any = None
    n_layers: Any = None
    n_heads: Any = None
    drop_rate: Any = 0.0
    qkv_bias: Any = True

    def problems(self, cfg: DictConfig) -> list[str]:
        from spam_lightning.training.checks import SIZE_KEYS, model_sizes

        problems = choice_problems("model.name", self.name, MODEL_CONFIGS, " (choose one with model=NAME)")
        problems += weights_problems(self.name, self.weights, self.checkpoint)
        for group, allowed in (("trainable", TRAINABLE), ("token", pooling_names(cfg.token))):
            fix = f" (choose one with {group}=NAME)"
            problems += choice_problems(f"{group}.name", cfg[group].name, allowed, fix)
        sizes = model_sizes(cfg)
        bad_sizes = [k for k in SIZE_KEYS if not is_int(sizes[k], 1)]
        problems += [f"model.{key}={sizes[key]!r}: must be an integer >= 1" for key in bad_sizes]
        if not bad_sizes and sizes["emb_dim"] % sizes["n_heads"]:
            problems.append(f"model.emb_dim={sizes['emb_dim']} is not divisible by model.n_heads={sizes['n_heads']}")
        if not bad_sizes:
            problems += _size_problems(sizes, cfg.data.get("pad_token_id"))
            rank = cfg.trainable.get("rank") if cfg.trainable.name == "lora" else None
            if is_int(rank, 1) and rank > sizes["emb_dim"]:  # the out head's B: rank x vocab
                problems.append(f"trainable.rank={rank}: must be <= model.emb_dim="
                                f"{sizes['emb_dim']} (a LoRA rank above a layer's smaller side "
                                f"adds only memory)")
        n_layers = sizes["n_layers"]
        if cfg.trainable.name == "last_two_blocks" and is_int(n_layers, 1) and n_layers < 2:
            problems.append(f"trainable=last_two_blocks needs at least 2 transformer blocks; model "
                            f"{self.name} has n_layers={n_layers}. Use trainable=last_block or a larger model.")
        if self.weights == "pretrained" and self.checkpoint is not None:
            if not Path(str(self.checkpoint)).expanduser().exists():
                problems.append(f"model.checkpoint={self.checkpoint}: no such file or folder")
        elif self.weights == "pretrained" and self.name in HUB_REPOS:  # the released sizes only
            released = MODEL_CONFIGS[self.name]
            if differ := [k for k in SIZE_KEYS if sizes[k] != released[k]]:
                problems.append(
                    f"pretrained {self.name} has {', '.join(f'{k}={released[k]}' for k in differ)}, "
                    f"but the config asks for {', '.join(f'{k}={sizes[k]}' for k in differ)}; other "
                    "sizes need model.weights=random or a model.checkpoint of that size")
        return problems + super().problems(cfg)

    def preflight(self, cfg: DictConfig) -> None:
        """The weights (a checkpoint's header, the cache or a quick Hub check) and the tokenizer."""
        from spam_lightning.data.tokens import get_tokenizer
        from spam_lightning.model.weights import check_checkpoint, check_weights_available
        from spam_lightning.training.checks import TokenizerError, model_sizes

        if self.weights == "pretrained":
            if self.checkpoint is not None:  # its header: GPT-2 of the configured size?
                check_checkpoint(self.checkpoint, model_sizes(cfg))
            else:  # cache or a quick Hub check, before minutes of data work and tokenizing
                check_weights_available(self.name)
        try:  # cached per process: a missing or damaged tokenizer fails now, with its own message
            get_tokenizer()
        except (RuntimeError, OSError) as err:  # what loading its files raises (DataError passes)
            raise TokenizerError(str(err)) from err

    def check_resume(self, cfg: DictConfig, path: Path, checkpoint: dict, num_classes: int | None) -> None:
        from spam_lightning.training import checks

        if num_classes is None:  # compare everything but the head now, the head after setup()
            state = checkpoint["state_dict"]
            head = state.get("model.out_head.weight", state.get("model.out_head.linear.weight"))
            num_classes = int(head.shape[0]) if head is not None else 2
        checks.check_resume_checkpoint(cfg, path, checkpoint, checks._expected_shapes(cfg, num_classes))

    def build(self, cfg: DictConfig, num_classes: int) -> GPTClassifier:
        return build_model(cfg, num_classes)

    def base_identity(self, cfg: DictConfig) -> dict[str, Any]:
        if self.weights == "random":
            return {"name": self.name, "source": "random", "seed": int(cfg.seed)}
        if self.checkpoint is not None:
            return {"name": self.name, "source": "file", "path": str(Path(self.checkpoint).expanduser().resolve())}
        cached = cached_weights(self.name)  # .../snapshots/<revision>/model.safetensors
        revision = cached.parent.name if cached is not None and cached.parent.parent.name == "snapshots" else None
        return {"name": self.name, "source": "hub", "repo": HUB_REPOS[self.name], "revision": revision}

    def save(self, run_dir: Path, model: Any, datamodule: Any, cfg: DictConfig,
             trained: dict[str, Any]) -> Path:
        from spam_lightning.inference.bundle import save_bundle
        from spam_lightning.training.checks import classifier_options

        return save_bundle(run_dir, model, class_names=list(datamodule.class_names), token=cfg.token.name,
                           max_length=datamodule.max_length, padding=cfg.data.padding,
                           pad_token_id=datamodule.pad_token_id, extra={"trained": trained},
                           base={**self.base_identity(cfg), "classifier": classifier_options(cfg)})

    @classmethod
    def load(cls, folder: Path, config: dict[str, Any], device: torch.device,
             dtype: torch.dtype) -> Predictor:
        from spam_lightning.inference.bundle import load_gpt2

        gpt, config = load_gpt2(folder, config)
        return GPT2Predictor(gpt, config, device, dtype)


class GPT2Predictor(Predictor):
    """The training run's preprocessing: GPT-2 tokens cut to ``max_length``, its padding and
    pooling; messages padded per batch where the pooled token never sees padding."""

    classifier: type[GPTClassifier] = GPTClassifier  # the decoders' DecoderClassifier

    def __init__(self, gpt: Any, config: dict[str, Any], device: torch.device, dtype: torch.dtype) -> None:
        self.device, self.model_cfg = device, config["model"]
        self.max_length = min(int(config["max_length"]), int(config["model"]["context_length"]))
        self.token = config["token"]
        if self.token == "mean" and not config.get("mean_includes_padding", False):
            self.token = "masked_mean"  # a bundle from before the rename: its mean was masked
        self.padding, self.pad_token_id = config["padding"], int(config["pad_token_id"])
        pooled = get_pooling(self.token)  # padding=none pooled each message's own tokens (last -> flexible)
        pooled = pooled.unpadded() if self.padding == "none" else pooled
        self.model = self.classifier(gpt, token=pooled).to(device=self.device, dtype=dtype).eval()
        self.dynamic = self.model.padding_free  # then per-batch padding is exact
        if self.padding == "none" and not self.dynamic:
            self.batch_size = 1  # no padding at all: one message per forward pass

    def encode(self, texts: list[str]) -> list[list[int]]:
        from spam_lightning.data.tokens import encode_texts

        return encode_texts(texts, max_length=self.max_length, context_length=self.max_length)

    def describe(self) -> dict[str, Any]:
        return {k: self.model_cfg[k] for k in ("emb_dim", "n_layers", "n_heads", "context_length")}
