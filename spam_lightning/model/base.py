"""The frozen base: a run keeps only what it changed (checkpoints and bundles); the rest is named
by where it comes from (``identity``) and a sha256 of its tensors, checked whenever it is rebuilt."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

import torch
from torch import nn


def frozen_keys(module: nn.Module) -> list[str]:
    """State-dict names of the parameters that do not train (what a checkpoint leaves out)."""
    return sorted(name for name, p in module.named_parameters() if not p.requires_grad)


def digest(state: Mapping[str, torch.Tensor], keys: Iterable[str]) -> str:
    """sha256 of ``keys``' names, dtypes, shapes and bytes (order-independent)."""
    h = hashlib.sha256()
    for key in sorted(keys):
        t = state[key].detach()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def describe(identity: Mapping | None) -> str:
    """``identity`` as a user names it: the Hub repo, the file or the random init."""
    if not identity:
        return "the model this config builds"
    if identity.get("source") == "random":
        return f"random-init {identity.get('name')} (seed {identity.get('seed')})"
    if identity.get("source") == "file":
        return f"{identity.get('name')} from {identity.get('path')}"
    revision = f" @ {identity['revision']}" if identity.get("revision") else ""
    return f"{identity.get('name')} ({identity.get('repo')}{revision} from the Hugging Face Hub)"
