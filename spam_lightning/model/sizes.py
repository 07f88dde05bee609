"""The one registry of GPT-2 sizes (the book's `model_configs`), read by the model, the weights
loader, the bundle and `conf/model/*.yaml` (`${gpt2:NAME,KEY}`); no torch import, so configs
resolve without loading the model code."""

from __future__ import annotations

from typing import Any

_GPT2_BASE: dict[str, Any] = {"vocab_size": 50257, "context_length": 1024, "drop_rate": 0.0, "qkv_bias": True}
# name: (emb_dim, n_layers, n_heads, Hub repo of the pretrained weights or None)
_SIZES = {
    "gpt2-small": (768, 12, 12, "openai-community/gpt2"),
    "gpt2-medium": (1024, 24, 16, "openai-community/gpt2-medium"),
    "gpt2-large": (1280, 36, 20, "openai-community/gpt2-large"),
    "gpt2-xl": (1600, 48, 25, "openai-community/gpt2-xl"),
    "gpt2-tiny": (64, 2, 4, None),  # random weights only: unit tests and CPU smoke runs
}
MODEL_CONFIGS: dict[str, dict[str, Any]] = {
    name: {**_GPT2_BASE, "emb_dim": emb, "n_layers": layers, "n_heads": heads}
    for name, (emb, layers, heads, _) in _SIZES.items()
}
HUB_REPOS: dict[str, str] = {name: s[3] for name, s in _SIZES.items() if s[3] is not None}
# The book's keys of a GPTModel config (+ `causal_mask`, which GPTModel adds).
CFG_KEYS = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "drop_rate", "qkv_bias")


def size(name: str, key: str) -> Any:
    """One size of a registered model (the `${gpt2:NAME,KEY}` resolver); None for an unknown name."""
    return MODEL_CONFIGS.get(name, {}).get(key)
