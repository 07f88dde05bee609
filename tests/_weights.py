"""Local GPT-2 weight files the tests write (no Hub here)."""

from __future__ import annotations

from pathlib import Path

import torch


def hf_weights(path: Path, seed: int) -> Path:
    """gpt2-tiny weights drawn with ``seed``, in the Hub's layout: a local ``model.checkpoint``."""
    from safetensors.torch import save_file

    from spam_lightning.model.gpt import GPTModel
    from spam_lightning.model.sizes import MODEL_CONFIGS
    from spam_lightning.model.weights import hf_plan

    torch.manual_seed(seed)
    model = GPTModel({**MODEL_CONFIGS["gpt2-tiny"]})
    state = model.state_dict()
    tensors = {}
    for key, entry in hf_plan(model.cfg).items():
        tensor = torch.cat([state[name] for name in entry.targets], 0)
        tensors[key] = (tensor.T if entry.transpose else tensor).contiguous()
    save_file(tensors, str(path))
    return path
