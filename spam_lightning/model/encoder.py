"""Encoder models (BERT family) as in the book's bonus scripts (ch06/03_bonus_imdb-classification/
train_bert_hf*.py): `AutoModelForSequenceClassification` with a new head, attention masks for the
right padding, `trainable` mapped per family. transformers is imported inside the functions."""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from spam_lightning.model.family import ModelFamily, Predictor
from spam_lightning.model.weights import (
    HUB_CHECK_TIMEOUT,
    WeightsUnavailableError,
    _probe,
    hub_settings,
)
from spam_lightning.rules import choice_problems, is_int

ENCODER_TRAINABLE = ("last_layer", "last_block", "all")
TRAINABLE_FIX = " for encoders (choose one with trainable=NAME)"
WEIGHTS = ("pretrained", "random")
MAX_LENGTH_CAP = 1_000_000  # tokenizers without a limit report model_max_length = 1e30
INSTALL = 'encoder models need transformers: pip install -e ".[hf]"'
# What `trainable` unfreezes (module paths in the AutoModelForSequenceClassification; `.-1` is
# the last layer of a ModuleList). The book sets distilbert's `out_head`, an attribute its
# forward never calls, so its last_layer trains nothing; we train `classifier`, the real head.
_LAST_BLOCK = {
    "distilbert": ("classifier", "pre_classifier", "distilbert.transformer.layer.-1"),
    "bert": ("classifier", "bert.pooler.dense", "bert.encoder.layer.-1"),
    "roberta": ("classifier", "roberta.encoder.layer.-1"),
    "modernbert": ("classifier", "head", "model.layers.-1"),
    "deberta-v2": ("classifier", "pooler", "deberta.encoder.layer.-1"),
}
_HEAD = dict.fromkeys(_LAST_BLOCK, ("classifier",))  # last_layer: the head alone
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spm.model")


class EncoderUnavailableError(WeightsUnavailableError):
    """The encoder named by model.name is neither a usable local folder nor to be had from the Hub."""


def _require_transformers() -> Any:
    try:
        import transformers
    except ImportError as err:
        raise ImportError(INSTALL) from err
    transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars on every load
    return transformers


def _from_pretrained(loader: Any, name_or_path: str | Path, local_files_only: bool = False,
                     **kwargs: Any) -> Any:
    """``loader.from_pretrained``: a folder; a Hub id from the cache first, then from the Hub
    unless ``local_files_only`` or HF_HUB_OFFLINE."""
    if (folder := Path(name_or_path).expanduser()).is_dir():
        return loader.from_pretrained(str(folder), **kwargs)
    cache, _, offline = hub_settings()
    try:
        return loader.from_pretrained(name_or_path, cache_dir=cache, local_files_only=True, **kwargs)
    except OSError as err:  # not (fully) cached
        if local_files_only or offline:
            why = "HF_HUB_OFFLINE is set" if offline else "local_files_only=True"
            raise _unavailable(str(name_or_path), f"it is not in the cache ({cache}); {why}") from err
    try:
        return loader.from_pretrained(name_or_path, cache_dir=cache, **kwargs)
    except OSError as err:
        first_line = str(err).strip().split("\n")[0].rstrip(".")
        raise _unavailable(str(name_or_path), f"loading it failed ({first_line})") from err


class EncoderTokenizer:
    """The model's own tokenizer (AutoTokenizer) with the interface the data module uses."""

    def __init__(self, name_or_path: str) -> None:
        transformers = _require_transformers()
        self.name = str(name_or_path)
        self._tok = _from_pretrained(transformers.AutoTokenizer, name_or_path)
        if self._tok.pad_token_id is None:
            raise ValueError(f"the tokenizer of {self.name} has no pad token; encoders need one")
        self.pad_token_id: int = int(self._tok.pad_token_id)
        self.model_max_length: int = int(min(self._tok.model_max_length, MAX_LENGTH_CAP))

    def encode(self, texts: Sequence[str], limit: int | None) -> list[list[int]]:
        """Ids with the special tokens, cut to ``limit`` tokens in all (the special ones kept,
        like ``tokenizer.encode(text, truncation=True, max_length=limit)``); None: uncut."""
        if not texts:
            return []
        specials = self._tok.num_special_tokens_to_add()
        if limit is not None and limit <= specials:  # transformers would silently not truncate
            raise ValueError(f"limit={limit} leaves no room for text: {self.name} adds {specials} "
                             "special tokens")
        out = self._tok(list(texts), truncation=limit is not None, max_length=limit)
        return [list(ids) for ids in out["input_ids"]]

    def save(self, folder: str | Path) -> None:
        self._tok.save_pretrained(str(folder))


class EncoderClassifier(nn.Module):
    """Class logits [B, num_classes] from right-padded token ids, called as the GPT classifier."""

    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.hf = hf
        self.family: str = hf.config.model_type

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """``lengths``: true lengths; the positions after them are padding, masked out."""
        mask = torch.ones_like(input_ids) if lengths is None else (
            torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]
            < lengths.to(input_ids.device)[:, None]).long()
        return self.hf(input_ids=input_ids, attention_mask=mask).logits

    def save(self, folder: str | Path) -> None:
        self.hf.save_pretrained(str(folder), safe_serialization=True)  # safetensors, no pickle


def build_encoder(name_or_path: str, *, num_classes: int, trainable: str = "all",
                  weights: str = "pretrained", seed: int = 123,
                  local_files_only: bool = False) -> EncoderClassifier:
    """`AutoModelForSequenceClassification` with a new seeded ``num_classes`` head, float32, in
    training mode, ``trainable`` applied; ``weights="random"``: the architecture from its config."""
    transformers = _require_transformers()
    auto = transformers.AutoModelForSequenceClassification
    if weights == "pretrained":
        torch.manual_seed(seed)
        # a folder must hold safetensors (no pickle); the Hub's .bin files, where a repo has no
        # safetensors, are read by transformers with torch.load(weights_only=True)
        safe = {"use_safetensors": True} if Path(name_or_path).expanduser().is_dir() else {}
        hf = _from_pretrained(auto, name_or_path, local_files_only, num_labels=num_classes,
                              ignore_mismatched_sizes=True, **safe)
    elif weights == "random":
        config = _from_pretrained(transformers.AutoConfig, name_or_path, local_files_only,
                                  num_labels=num_classes)
        torch.manual_seed(seed)
        hf = auto.from_config(config)
    else:
        raise ValueError(choice_problems("model.weights", weights, WEIGHTS)[0])
    # float32 master weights whatever the checkpoint's dtype (transformers 5 loads "auto")
    model = EncoderClassifier(hf.float())
    model.train()  # from_pretrained returns eval mode; like build_gpt, start in training mode
    set_trainable(model, trainable)
    return model


def set_trainable(model: EncoderClassifier, trainable: str) -> None:
    """Freeze all but what ``trainable`` names for the model's family (``all``: any family)."""
    if problems := choice_problems("trainable", trainable, ENCODER_TRAINABLE, TRAINABLE_FIX):
        raise ValueError(problems[0])
    if trainable == "all":
        model.requires_grad_(True)
        return
    table = _HEAD if trainable == "last_layer" else _LAST_BLOCK
    if model.family not in table:
        raise ValueError(f"trainable={trainable} is defined for the families {', '.join(table)}, not "
                         f"for {model.family!r} (config.model_type); use trainable=all, which works "
                         "for any model")
    model.requires_grad_(False)
    for path in table[model.family]:  # `.-1`: the last layer of a ModuleList
        module = model.hf.get_submodule(path.removesuffix(".-1"))
        (module[-1] if path.endswith(".-1") else module).requires_grad_(True)


def load_encoder(folder: str | Path, device: str = "cpu") -> tuple[EncoderClassifier, EncoderTokenizer]:
    """A fine-tuned encoder and its tokenizer from a bundle folder, in eval mode on ``device``."""
    transformers = _require_transformers()
    check_encoder_available(str(folder), "pretrained")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(
        str(Path(folder).expanduser()), local_files_only=True, use_safetensors=True)
    model = EncoderClassifier(hf.float()).to(device).eval()
    return model, EncoderTokenizer(str(folder))


def _unavailable(name: str, reason: str) -> EncoderUnavailableError:
    return EncoderUnavailableError(
        f"model.name={name}: cannot load the encoder: {reason}. Fix: pass a local folder with "
        "model.name=/path/to/folder (written by save_pretrained of the model and its tokenizer, "
        "weights as .safetensors), or run where huggingface.co is reachable once to fill the "
        "Hugging Face cache.")


def _check_folder(path: Path, weights: str) -> str | None:
    """Why the folder cannot serve as an encoder checkpoint, or None."""
    if not path.is_dir():
        return f"{path} is not a folder" if path.exists() else f"no folder {path} exists"
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as err:
        return f"{path} holds no readable config.json ({type(err).__name__})"
    if not isinstance(config, dict) or "model_type" not in config:
        return f"{path}/config.json has no model_type: not a transformers checkpoint"
    if weights == "pretrained" and not any(path.glob("*.safetensors")):
        found = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl"))
        return (f"{path} holds no .safetensors weights{f' (only {found})' if found else ''}; "
                "weights are read only from safetensors")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        return f"{path} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)})"
    return None


def check_encoder_available(name_or_path: str, weights: str, timeout: float = HUB_CHECK_TIMEOUT) -> None:
    """Fail fast, before any data work: a folder must hold config.json, a tokenizer and (for
    pretrained weights) safetensors; a Hub id must be cached or served by the Hub (one probe)."""
    if importlib.util.find_spec("transformers") is None:
        raise ImportError(INSTALL)
    path, name = Path(name_or_path).expanduser(), str(name_or_path)
    looks_local = path.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1
    if path.exists() or looks_local:
        if reason := _check_folder(path, weights):
            raise _unavailable(name, reason)
        return
    from huggingface_hub import get_token, try_to_load_from_cache

    cache, endpoint, offline = hub_settings()
    groups = [("config.json",)] + ([WEIGHT_FILES] if weights == "pretrained" else [])
    try:
        if all(any(isinstance(try_to_load_from_cache(name, f, cache_dir=cache), str) for f in group)
               for group in groups):
            return
    except ValueError as err:  # HFValidationError: not a possible repo id
        raise _unavailable(name, f"it is neither an existing folder nor a Hub id ({err})") from err
    where = f"{name} is not a local folder and not in the Hugging Face cache ({cache})"
    if offline:
        raise _unavailable(name, f"{where}, and HF_HUB_OFFLINE is set")
    reason = _probe(f"{endpoint}/{name}/resolve/main/config.json", timeout)
    # the probe sends no token: with one, a gated or private repo's 401/403 is for
    # from_pretrained to decide (the Hub also answers 401 for repos that do not exist)
    if reason is not None and not (re.search(r"HTTP 40[13]", reason) and get_token()):
        raise _unavailable(name, f"{where}, and the Hub ({endpoint}) cannot serve it: {reason}")


@dataclass
class EncoderFamily(ModelFamily):
    """``model=encoder``: ``name`` a Hub id or a save_pretrained folder, ``weights`` pretrained
    or random, ``context_length`` the longest input the data may pad to."""

    kind = "encoder"
    plain_options = {"weights": "random"}
    name: str = "distilbert-base-uncased"
    weights: str = "pretrained"
    context_length: Any = 512

    def problems(self, cfg: DictConfig) -> list[str]:
        problems = choice_problems("model.weights", self.weights, WEIGHTS)
        problems += choice_problems("trainable.name", cfg.trainable.name, ENCODER_TRAINABLE, TRAINABLE_FIX)
        if importlib.util.find_spec("transformers") is None:
            problems.append(INSTALL)
        if not isinstance(self.name, str) or not self.name.strip():
            problems.append(f"model.name={self.name!r}: a Hub id or a local save_pretrained folder")
        if not is_int(self.context_length, 1):
            problems.append(f"model.context_length={self.context_length!r}: must be an integer >= 1")
        if cfg.token.name != "last":  # each family pools its own way (BERT: the [CLS] token)
            problems.append(f"token={cfg.token.name}: the token option is GPT-2's; an encoder pools "
                            "as its family does (drop the token override)")
        if str(cfg.cache.trunk).lower() == "true":
            problems.append("cache.trunk=true: the frozen-trunk cache is GPT-2's; use cache.trunk=auto")
        return problems + super().problems(cfg)

    def preflight(self, cfg: DictConfig) -> None:
        check_encoder_available(self.name, self.weights)

    def tokenizer(self, cfg: DictConfig) -> EncoderTokenizer:
        from spam_lightning.training.checks import ConfigError

        try:
            return EncoderTokenizer(self.name)
        except ValueError as err:  # a tokenizer without a pad token
            raise ConfigError(f"model.name={self.name}: {err}") from err

    def build(self, cfg: DictConfig, num_classes: int) -> EncoderClassifier:
        from spam_lightning.training.checks import ConfigError

        try:  # e.g. trainable=last_block for a family without the book's mapping
            return build_encoder(cfg.model.name, num_classes=num_classes, trainable=cfg.trainable.name,
                                 weights=cfg.model.weights, seed=cfg.seed)
        except ValueError as err:
            raise ConfigError(str(err)) from err

    def save(self, run_dir: Path, model: Any, datamodule: Any, cfg: DictConfig,
             trained: dict[str, Any]) -> Path:
        """The model and its tokenizer, saved with ``save_pretrained`` (safetensors)."""
        from spam_lightning.inference.bundle import fresh_bundle_dir, write_bundle_config

        out = fresh_bundle_dir(run_dir)
        model.save(out)
        datamodule.tokenizer.save(out)
        return write_bundle_config(out, self.kind, list(datamodule.class_names),
                                   max_length=int(datamodule.max_length), padding=cfg.data.padding,
                                   pad_token_id=int(datamodule.tokenizer.pad_token_id),
                                   family=model.family, trained=trained)

    @classmethod
    def load(cls, folder: Path, config: dict[str, Any], device: torch.device,
             dtype: torch.dtype) -> Predictor:
        from spam_lightning.data.tokens import PADDING_MODES
        from spam_lightning.inference import bundle

        config_path = folder / bundle.CONFIG
        bundle.check_class_count(config, config_path)
        for key, low in (("max_length", 1), ("pad_token_id", 0)):
            if not is_int(config.get(key), low):
                raise bundle.bad_field(config_path, key, config.get(key))
        if config.get("padding") not in PADDING_MODES:
            raise bundle.bad_field(config_path, "padding", config.get("padding"))
        try:
            model, tokenizer = load_encoder(folder)
        except (OSError, ValueError) as err:
            raise bundle.BundleError(f"{folder}: cannot load the encoder ({err}); "
                                     "re-create the bundle.") from err
        if (outputs := int(model.hf.config.num_labels)) != config["num_classes"]:
            raise bundle.BundleError(f"{config_path}: num_classes is {config['num_classes']} but the "
                                     f"model's head has {outputs} outputs; re-create the bundle.")
        return EncoderPredictor(model.to(device=device, dtype=dtype).eval(), tokenizer, config, device)


class EncoderPredictor(Predictor):
    """Attention masks make per-batch padding exact: messages are grouped by length."""

    dynamic = True

    def __init__(self, model: EncoderClassifier, tokenizer: EncoderTokenizer,
                 config: dict[str, Any], device: torch.device) -> None:
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.max_length, self.padding = int(config["max_length"]), config["padding"]
        self.pad_token_id, self.family = int(config["pad_token_id"]), config.get("family")

    def encode(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer.encode(texts, self.max_length)

    def describe(self) -> Any:
        return self.family
