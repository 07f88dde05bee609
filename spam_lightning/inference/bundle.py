"""The inference bundle: classifier weights as safetensors plus what rebuilds model and preprocessing.

A run folder's ``bundle/`` holds ``model.safetensors`` and ``bundle.json``. It needs neither the
Hydra config nor the original pretrained checkpoint: LoRA adapters are merged into the weights
before saving, so the bundle is always a plain ``GPTModel`` with a class head.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from spam_lightning.io_utils import atomic_write, write_json
from spam_lightning.model.classifier import ClassifierStateError, load_classifier_state
from spam_lightning.model.gpt import GPTModel
from spam_lightning.model.sizes import CFG_KEYS

BUNDLE_FORMAT = "spam-lightning-bundle/1"
BUNDLE_DIR = "bundle"
WEIGHTS = "model.safetensors"
CONFIG = "bundle.json"
REQUIRED_KEYS = ("model", "num_classes", "class_names", "token", "max_length", "padding", "pad_token_id")


class BundleError(RuntimeError):
    """A run folder without a usable inference bundle."""


def _plain_model(model: nn.Module) -> nn.Module:
    """A copy of the model with any LoRA adapters merged into plain Linear layers."""
    from spam_lightning.model.lora import LinearWithLoRA, merge_lora

    if not any(isinstance(m, LinearWithLoRA) for m in model.modules()):
        return model
    return merge_lora(copy.deepcopy(model))


def save_bundle(
    run_dir: str | Path, model: GPTModel, *, class_names: list[str], token: str, max_length: int,
    padding: str, pad_token_id: int, extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``run_dir/bundle/{model.safetensors,bundle.json}`` atomically."""
    out = Path(run_dir) / BUNDLE_DIR
    plain = _plain_model(model)
    state = {k: v.detach().to("cpu").contiguous() for k, v in plain.state_dict().items()}
    atomic_write(out / WEIGHTS, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
    gpt_cfg = {k: plain.cfg[k] for k in CFG_KEYS}
    gpt_cfg["causal_mask"] = bool(plain.cfg.get("causal_mask", True))
    config = {
        "format": BUNDLE_FORMAT, "model": gpt_cfg, "num_classes": len(class_names),
        "class_names": list(class_names), "token": token, "max_length": int(max_length),
        "padding": padding, "pad_token_id": int(pad_token_id), "tokenizer": "gpt2",
        # token=mean is the book's mean, padding included; bundles without this key are older,
        # from when token=mean averaged the real tokens only (read as masked_mean, see classify.py)
        "mean_includes_padding": True, **(extra or {}),
    }
    write_json(out / CONFIG, config)  # written last: its presence marks a complete bundle
    return out


def find_bundle(path: str | Path) -> Path:
    """The bundle folder for a run folder (or the bundle folder itself), or a clear error."""
    path = Path(path)
    if not path.exists():
        raise BundleError(f"Run folder not found: {path}. Pass the folder of a finished training run.")
    for candidate in (path / BUNDLE_DIR, path):
        if (candidate / CONFIG).is_file():
            if not (candidate / WEIGHTS).is_file():
                raise BundleError(f"Incomplete bundle in {candidate}: {WEIGHTS} is missing.")
            return candidate
    raise BundleError(
        f"No inference bundle in {path}: expected {path / BUNDLE_DIR / CONFIG} and "
        f"{path / BUNDLE_DIR / WEIGHTS}. The run may have failed or still be running; a finished "
        "`python train.py` run writes them at the end."
    )


def load_bundle(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[GPTModel, dict]:
    """Rebuild the classifier from a bundle; returns ``(model, bundle_config)``."""
    folder = find_bundle(path)
    try:
        config = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise BundleError(f"{folder / CONFIG} is not valid JSON: {err}") from err
    if not isinstance(config, dict) or config.get("format") != BUNDLE_FORMAT:
        found = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise BundleError(
            f"{folder / CONFIG}: unknown format {found!r}, expected {BUNDLE_FORMAT!r}."
        )
    missing_keys = [k for k in REQUIRED_KEYS if k not in config]
    if missing_keys:
        raise BundleError(f"{folder / CONFIG} lacks {missing_keys}; re-create the bundle.")
    try:
        model = GPTModel(config["model"])
        model.out_head = nn.Linear(config["model"]["emb_dim"], config["num_classes"])
    except (KeyError, TypeError, ValueError, AssertionError) as err:
        raise BundleError(f"{folder / CONFIG}: invalid model settings ({err!r}).") from err
    try:
        # safetensors only: a bundle is never unpickled, so a crafted file cannot run code
        state = load_file(str(folder / WEIGHTS), device=str(map_location))
    except Exception as err:  # SafetensorError (bad header, truncated), OSError
        raise BundleError(
            f"{folder / WEIGHTS} is not a readable safetensors file ({err}). Bundles hold "
            "weights only as safetensors, never pickles; re-create it with a training run."
        ) from err
    try:
        load_classifier_state(model, state)
    except ClassifierStateError as err:
        raise BundleError(f"{folder / WEIGHTS} does not match {folder / CONFIG}: {err}") from err
    model.eval()
    return model, config
