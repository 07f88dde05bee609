"""GPT-2 as a classifier (chapter 6.5): `make_classifier` swaps the head and chooses what trains;
`GPTClassifier` is the one classification forward of training and inference."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from spam_lightning.model.gpt import GPTModel
from spam_lightning.model.lora import check_lora_options, replace_linear_with_lora
from spam_lightning.model.pooling import Pooling, get_pooling
from spam_lightning.model.weights import mismatch_lines

TRAINABLE = ("last_layer", "last_block", "last_two_blocks", "all", "lora")


class ClassifierStateError(ValueError):
    """A fine-tuned checkpoint that does not fit the model (size or number of classes)."""


def first_trainable_block(trainable: str, n_layers: int) -> int | None:
    """Index of the first block that trains (blocks before it: a cacheable frozen trunk);
    `n_layers`: head only; None: nothing frozen (`all`, `lora` with adapters in every block)."""
    if trainable not in TRAINABLE:
        raise ValueError(f"unknown trainable={trainable!r}; allowed: {', '.join(TRAINABLE)}")
    if trainable == "last_two_blocks" and n_layers < 2:
        raise ValueError(f"trainable=last_two_blocks needs >= 2 transformer blocks, got {n_layers}")
    return {"last_layer": n_layers, "last_block": n_layers - 1, "last_two_blocks": n_layers - 2}.get(trainable)


def make_classifier(model: GPTModel, num_classes: int = 2, trainable: str = "last_block",
                    rank: int = 16, alpha: float = 16, seed: int = 123) -> GPTModel:
    """Chapter 6.5 in the book's order, in place: freeze everything, seed (the same new head and
    LoRA A in every run), swap `out_head` for `Linear(emb_dim, num_classes)`, unfreeze `trainable`."""
    n_layers = len(model.trf_blocks)
    first = first_trainable_block(trainable, n_layers)  # validates the name and depth
    if trainable == "lora":
        check_lora_options(rank, alpha)
    model.requires_grad_(False)
    torch.manual_seed(seed)
    model.out_head = nn.Linear(model.tok_emb.embedding_dim, num_classes, device=model.tok_emb.weight.device)
    if trainable == "all":
        model.requires_grad_(True)
    elif trainable == "lora":
        replace_linear_with_lora(model, rank=rank, alpha=alpha)
        model.out_head.linear.requires_grad_(True)  # the new head is not pretrained: train it
    else:
        for block in model.trf_blocks[first:]:
            block.requires_grad_(True)
        if trainable != "last_layer":
            model.final_norm.requires_grad_(True)
    return model


class GPTClassifier(GPTModel):
    """Class logits from token ids or the frozen trunk's features. Takes over the modules of a
    GPTModel with a class head under the same names: the same state dict, nothing copied."""

    def __init__(self, gpt: GPTModel, token: str | Pooling = "last") -> None:
        nn.Module.__init__(self)
        self.cfg, self.pooling = gpt.cfg, get_pooling(token)
        self.tok_emb, self.pos_emb, self.drop_emb = gpt.tok_emb, gpt.pos_emb, gpt.drop_emb
        self.trf_blocks, self.final_norm, self.out_head = gpt.trf_blocks, gpt.final_norm, gpt.out_head

    @property
    def padding_free(self) -> bool:
        """Whether right padding never changes the result (then per-batch padding is exact)."""
        return self.causal_mask and not self.pooling.reads_padding()

    def needed_length(self, width: int, lengths: torch.Tensor) -> int:
        """How many leading positions the pooled vector depends on (cutting the rest is exact)."""
        return int(self.pooling.span(width, lengths).max()) if self.causal_mask else width

    def forward(
        self, x: torch.Tensor, lengths: torch.Tensor | None = None, start_block: int | None = None
    ) -> torch.Tensor:
        """``x``: token ids ``[B, T]``, or with ``start_block`` k the states entering block k;
        ``lengths``: true lengths. Two exact shortcuts: inputs are cut to ``needed_length``; the
        last block runs only at the pooled position when the pooling reads one per row."""
        lengths = (torch.full((len(x),), x.shape[1]) if lengths is None else lengths).to(x.device)
        width = self.needed_length(x.shape[1], lengths)
        x = self.embed(x[:, :width]) if start_block is None else x[:, :width]
        start_block = start_block or 0
        n_blocks = len(self.trf_blocks)
        positions = self.pooling.positions(width, lengths)
        last_block = self.trf_blocks[n_blocks - 1] if start_block < n_blocks else None
        # an FSDP-wrapped block must go through its own forward (which gathers its weights):
        # the block's own class must define forward_at (GPT-2's TransformerBlock, DecoderBlock)
        if positions is not None and hasattr(type(last_block), "forward_at"):
            x = self.call_block(last_block, self.run_blocks(x, start_block, n_blocks - 1), positions,
                                method="forward_at")
            return self.out_head(self.final_norm(x))
        # pool before the (affine) head: identical result, computed on B rows instead of B*T
        return self.out_head(self.pooling(self.final_norm(self.run_blocks(x, start_block)), lengths))


def load_classifier_state(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """`model.load_state_dict`, or one ClassifierStateError listing every mismatch."""
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
        lines.append(f"  it has {len(blocks)} transformer blocks, the model has {len(model.trf_blocks)}")
    raise ClassifierStateError("\n".join(lines + [f"  {line}" for line in problems]))
