"""LoRA, as in appendix E of the book: `LinearWithLoRA(x) = linear(x) + alpha * (x @ A @ B)`
next to each frozen Linear, B starting at zero (a no-op); `merge_lora` folds it in for inference."""

from __future__ import annotations

import math

import torch
from torch import nn


def check_lora_options(rank: object, alpha: object) -> None:
    """Raise a ValueError unless ``rank`` is an integer >= 1 and ``alpha`` a finite number > 0."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be an integer >= 1, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"LoRA alpha must be a finite number > 0, got {alpha!r}")


class LoRALayer(nn.Module):
    """The low-rank update `alpha * (x @ A @ B)`; A is [in, rank], B is [rank, out]."""

    def __init__(self, in_dim: int, out_dim: int, rank: int, alpha: float) -> None:
        super().__init__()
        check_lora_options(rank, alpha)
        self.A = nn.Parameter(torch.empty(in_dim, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # as nn.Linear initialises its weight
        self.B = nn.Parameter(torch.zeros(rank, out_dim))  # zero: the update starts as a no-op
        self.alpha = alpha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.alpha * (x @ self.A @ self.B)

    def extra_repr(self) -> str:
        return f"rank={self.A.shape[1]}, alpha={self.alpha}"


class LinearWithLoRA(nn.Module):
    """A Linear layer (kept as `.linear`) plus its LoRA update (`.lora`)."""

    def __init__(self, linear: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.linear = linear
        self.lora = LoRALayer(linear.in_features, linear.out_features, rank, alpha)
        self.lora.to(device=linear.weight.device, dtype=linear.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + self.lora(x)


def replace_linear_with_lora(model: nn.Module, rank: int, alpha: float) -> nn.Module:
    """Wrap every nn.Linear in `model`, recursively and in place (already wrapped ones are left
    alone, so calling it twice does not stack adapters). Returns `model`."""
    for name, module in model.named_children():
        if isinstance(module, LinearWithLoRA):
            continue
        if isinstance(module, nn.Linear):
            setattr(model, name, LinearWithLoRA(module, rank, alpha))
        else:
            replace_linear_with_lora(module, rank, alpha)
    return model


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LinearWithLoRA by a plain nn.Linear with weight W + alpha * (A @ B)^T,
    in place; returns `model`. Same outputs, no adapter overhead, loadable without this file."""
    for name, module in model.named_children():
        if isinstance(module, LinearWithLoRA):
            base, lora = module.linear, module.lora
            merged = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                               device=base.weight.device, dtype=base.weight.dtype)
            merged.weight.copy_(base.weight + lora.alpha * (lora.A @ lora.B).T)
            if base.bias is not None:
                merged.bias.copy_(base.bias)
            merged.requires_grad_(base.weight.requires_grad)
            setattr(model, name, merged)
        else:
            merge_lora(module)
    return model
