"""GPT-2 as a classifier (chapter 6.5): `make_classifier` swaps the head and chooses what
trains (`trainable`); `GPTClassifier` is the whole classification forward, shared by training
and inference: trunk, optional frozen-trunk cache, pruned last block, pooling (`token`), head.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from spam_lightning.model.gpt import GPTModel, TransformerBlock
from spam_lightning.model.lora import check_lora_options, replace_linear_with_lora
from spam_lightning.model.trunk_cache import TrunkCache
from spam_lightning.model.weights import mismatch_lines

TRAINABLE = ("last_layer", "last_block", "last_two_blocks", "all", "lora")
# `mean`: the book's --average_embeddings (row 19), every position, padding included;
# `masked_mean`: the real tokens only (independent of padding, so the fast paths apply)
TOKENS = ("last", "first", "flexible", "mean", "masked_mean")
READS_REAL_TOKENS_ONLY = ("first", "flexible", "masked_mean")  # never see right padding


class ClassifierStateError(ValueError):
    """A fine-tuned checkpoint that does not fit the model (size or number of classes)."""


def first_trainable_block(trainable: str, n_layers: int) -> int | None:
    """Index of the first block that trains (blocks before it: a cacheable frozen trunk);
    `n_layers`: head only; None: nothing frozen (`all`, `lora` with adapters in every block)."""
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
    model: GPTModel, num_classes: int = 2, trainable: str = "last_block", rank: int = 16,
    alpha: float = 16, seed: int = 123,
) -> GPTModel:
    """Chapter 6.5, in the book's order, in place: freeze everything, seed (the same new head
    and LoRA A in every run), swap `out_head` for a `Linear(emb_dim, num_classes)`, unfreeze
    what `trainable` names. `rank` and `alpha` are LoRA's, used as given."""
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
    """Per-token outputs [B, T, C] -> [B, C]: `last` position -1 (the chapter), `first` 0,
    `flexible` the last real token (lengths-1), `mean` the average over all T positions,
    padding included (the book's ``model(x).mean(dim=1)``), `masked_mean` the average over the
    first `lengths` positions (right padding ignored). `lengths` [B] may be None when nothing
    is padded."""
    if token == "last":
        return logits[:, -1, :]
    if token == "first":
        return logits[:, 0, :]
    if token == "mean":
        return logits.mean(dim=1)
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


class GPTClassifier(GPTModel):
    """Class logits ``[B, num_classes]`` from token ids: the one classification forward.

    Takes over the modules of a GPTModel with a class head (``make_classifier``) under the same
    names, so its state dict is that GPTModel's (checkpoints, bundles) and nothing is copied.
    ``trunk_cache`` (built by training's ``TrunkCaching``) holds the frozen blocks' output for
    examples identified by ``(split, index)``.
    """

    def __init__(self, gpt: GPTModel, token: str = "last") -> None:
        nn.Module.__init__(self)
        if token not in TOKENS:
            raise ValueError(f"unknown token={token!r}; allowed: {', '.join(TOKENS)}")
        self.cfg, self.token = gpt.cfg, token
        self.tok_emb, self.pos_emb, self.drop_emb = gpt.tok_emb, gpt.pos_emb, gpt.drop_emb
        self.trf_blocks, self.final_norm, self.out_head = gpt.trf_blocks, gpt.final_norm, gpt.out_head
        self.trunk_cache: TrunkCache | None = None

    def needed_length(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> int:
        """How many leading positions the pooled token depends on: with a causal mask, 1 for
        `first` and the longest real length for `flexible`/`masked_mean` (cutting the rest is
        exact); every position for `last` and for the book's `mean` (it averages the padding)."""
        full = input_ids.shape[1]
        if not self.causal_mask or self.token not in READS_REAL_TOKENS_ONLY:
            return full
        if self.token == "first":
            return 1
        return min(full, int(lengths.max()))

    def pooled_positions(self, width: int, lengths: torch.Tensor) -> torch.Tensor | None:
        """The one position per row that the pooled token reads, or None for the means:
        ``last`` -> width-1, ``first`` -> 0, ``flexible`` -> lengths-1. Only these rows of the
        last block's output are ever used, which is what lets ``forward`` prune that block."""
        batch = lengths.shape[0]
        if self.token == "last":
            return torch.full((batch,), width - 1, dtype=torch.long, device=lengths.device)
        if self.token == "first":
            return torch.zeros(batch, dtype=torch.long, device=lengths.device)
        if self.token == "flexible":
            return (lengths.long() - 1).clamp(min=0, max=width - 1)
        return None

    def forward(
        self, input_ids: torch.Tensor, lengths: torch.Tensor | None = None,
        index: torch.Tensor | None = None, split: str | None = None,
    ) -> torch.Tensor:
        """Class logits ``[B, num_classes]``; ``lengths``: true lengths (right padding).

        Three exact shortcuts (equal to the full forward within float rounding): the frozen
        trunk's states come from the cache when it holds ``split``; inputs are cut to
        ``needed_length``; the last block runs only at the pooled position (``forward_at``)
        unless pooling is a mean. The book's ``mean`` reads every position, padding included.
        """
        if lengths is None:
            lengths = torch.full((input_ids.shape[0],), input_ids.shape[1], device=input_ids.device)
        width = self.needed_length(input_ids, lengths)
        cache = self.trunk_cache
        if cache is not None and split is not None and index is not None and cache.has(split):
            x, start = cache.lookup(split, index, width, device=input_ids.device), cache.start_block
        else:
            x, start = self.embed(input_ids[:, :width]), 0
        n_blocks = len(self.trf_blocks)
        positions = self.pooled_positions(width, lengths.to(input_ids.device))
        last_block = self.trf_blocks[n_blocks - 1] if start < n_blocks else None
        # an FSDP-wrapped block must go through its own forward (which gathers its weights)
        if positions is not None and isinstance(last_block, TransformerBlock):
            x = last_block.forward_at(self.run_blocks(x, start=start, end=n_blocks - 1), positions)
            return self.out_head(self.final_norm(x))
        x = self.final_norm(self.run_blocks(x, start=start))
        # pool before the (affine) head: identical result, computed on B rows instead of B*T
        return self.out_head(pool_logits(x, lengths, self.token))


def load_classifier_state(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """`model.load_state_dict`, or one ClassifierStateError listing every missing, unexpected
    or mis-shaped tensor and saying when the weights are of another size or class count."""
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state_dict.items()}
    problems = mismatch_lines(own, found)
    if not problems:
        model.load_state_dict(state_dict)
        return
    lines = ["the checkpoint does not fit this model:"]
    head = "out_head.linear.weight" if "out_head.linear.weight" in own else "out_head.weight"
    if head in own and head in found and found[head] != own[head]:
        if found[head][0] != own[head][0]:
            lines.append(f"  it has {found[head][0]} classes, the model has {own[head][0]}")
        if found[head][1:] != own[head][1:]:
            lines.append(f"  its emb_dim is {found[head][1]}, the model's is {own[head][1]}")
    blocks = {k.split(".")[1] for k in found if k.startswith("trf_blocks.")}
    if blocks and len(blocks) != len(getattr(model, "trf_blocks", ())):
        lines.append(
            f"  it has {len(blocks)} transformer blocks, the model has {len(model.trf_blocks)}"
        )
    raise ClassifierStateError("\n".join(lines + [f"  {line}" for line in problems]))
