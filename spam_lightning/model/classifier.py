"""Turn GPT-2 into a classifier (chapter 6.5) and pool its per-token outputs (exercise 6.3 and
the follow-up experiments).

`trainable` chooses what fine-tuning may change; `token` chooses which position's output is the
sequence's prediction.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from spam_lightning.model.gpt import GPTModel
from spam_lightning.model.lora import check_lora_options, replace_linear_with_lora

TRAINABLE = ("last_layer", "last_block", "last_two_blocks", "all", "lora")
TOKENS = ("last", "first", "flexible", "mean")


class ClassifierStateError(ValueError):
    """A fine-tuned checkpoint that does not fit the model (size or number of classes)."""


def first_trainable_block(trainable: str, n_layers: int) -> int | None:
    """Index of the first block that trains; blocks before it are a frozen trunk whose output
    can be cached. `n_layers` means no block trains (head only); None means nothing is frozen
    (`all`, and `lora`, whose adapters sit in every block)."""
    if trainable not in TRAINABLE:
        raise ValueError(f"unknown trainable={trainable!r}; allowed: {', '.join(TRAINABLE)}")
    if trainable == "last_two_blocks" and n_layers < 2:
        raise ValueError(f"trainable=last_two_blocks needs >= 2 transformer blocks, got {n_layers}")
    return {
        "last_layer": n_layers,
        "last_block": n_layers - 1,
        "last_two_blocks": n_layers - 2,
    }.get(trainable)


def make_classifier(
    model: GPTModel,
    num_classes: int = 2,
    trainable: str = "last_block",
    rank: int = 16,
    alpha: float = 16,
    seed: int = 123,
) -> GPTModel:
    """Chapter 6.5, in the book's order: freeze everything, seed, swap `out_head` for a
    `Linear(emb_dim, num_classes)`, then unfreeze what `trainable` names. In place; returns
    `model`. The seed makes the new head (and LoRA's A) the same for every run. `rank` and
    `alpha` are LoRA's (used as given: a rank < 1 or a non-positive alpha is an error)."""
    n_layers = len(model.trf_blocks)
    first = first_trainable_block(trainable, n_layers)  # validates the name and depth
    if trainable == "lora":
        check_lora_options(rank, alpha)
    model.requires_grad_(False)
    torch.manual_seed(seed)
    emb_dim = model.tok_emb.embedding_dim
    model.out_head = nn.Linear(emb_dim, num_classes, device=model.tok_emb.weight.device)
    if trainable == "all":
        model.requires_grad_(True)
    elif trainable == "lora":
        replace_linear_with_lora(model, rank=rank, alpha=alpha)
        model.out_head.linear.requires_grad_(True)  # the new head is not pretrained: train it
    else:
        assert first is not None
        for block in model.trf_blocks[first:]:
            block.requires_grad_(True)
        if trainable != "last_layer":
            model.final_norm.requires_grad_(True)
    return model


def pool_logits(logits: torch.Tensor, lengths: torch.Tensor | None, token: str) -> torch.Tensor:
    """Per-token outputs [B, T, C] -> one row per sequence [B, C].

    `last`: position -1 (the chapter); `first`: position 0; `flexible`: the last real token,
    position lengths-1; `mean`: average over the first `lengths` positions, so right padding is
    ignored. `lengths` ([B], true lengths) may be None when nothing is padded.
    """
    if token == "last":
        return logits[:, -1, :]
    if token == "first":
        return logits[:, 0, :]
    if token not in TOKENS:
        raise ValueError(f"unknown token={token!r}; allowed: {', '.join(TOKENS)}")
    batch, seq_len, _ = logits.shape
    if lengths is None:
        lengths = torch.full((batch,), seq_len, device=logits.device)
    lengths = lengths.to(logits.device)
    if token == "flexible":
        return logits[torch.arange(batch, device=logits.device), lengths - 1]
    mask = torch.arange(seq_len, device=logits.device)[None, :] < lengths[:, None]  # [B, T]
    summed = (logits * mask.unsqueeze(-1).to(logits.dtype)).sum(dim=1)
    return summed / lengths.clamp(min=1).unsqueeze(-1).to(logits.dtype)


def load_classifier_state(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """`model.load_state_dict` for fine-tuned weights, with one readable error listing every
    missing, unexpected or mis-shaped tensor (expected vs found), and saying when the checkpoint
    was trained for another model size or number of classes."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    wrong = [
        f"{k} expected {list(own[k].shape)} found {list(state_dict[k].shape)}"
        for k in own
        if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)
    ]
    if not (missing or unexpected or wrong):
        model.load_state_dict(state_dict)
        return
    lines = ["the checkpoint does not fit this model:"]
    head = "out_head.linear.weight" if "out_head.linear.weight" in own else "out_head.weight"
    if head in own and head in state_dict and state_dict[head].shape != own[head].shape:
        found, expected = tuple(state_dict[head].shape), tuple(own[head].shape)
        if found[0] != expected[0]:
            lines.append(f"  it has {found[0]} classes, the model has {expected[0]}")
        if found[1:] != expected[1:]:
            lines.append(f"  its emb_dim is {found[1]}, the model's is {expected[1]}")
    blocks = {k.split(".")[1] for k in state_dict if k.startswith("trf_blocks.")}
    if blocks and len(blocks) != len(getattr(model, "trf_blocks", ())):
        lines.append(
            f"  it has {len(blocks)} transformer blocks, the model has {len(model.trf_blocks)}"
        )
    for title, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if names:
            lines.append(f"  {title} ({len(names)}): " + ", ".join(names))
    raise ClassifierStateError("\n".join(lines))
