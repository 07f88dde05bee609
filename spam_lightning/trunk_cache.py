"""Frozen-trunk cache: the hidden states after the frozen blocks, computed once per example.

When only blocks k.. train and blocks 0..k-1 are frozen and deterministic (no dropout), every
forward pass through 0..k-1 returns the same states for the same example. The chapter recomputes
them for every batch of every epoch and every evaluation; here they are computed once.

Exactness: an example is run through the trunk padded to the split's full ``max_length``, as in
the chapter. With a causal mask position t depends only on positions <= t, so the prefix of those
states is also exactly what a shorter (per-batch) padding would give. How much of each example is
stored depends on which positions the pooled token can read:

- ``last``: every position (the pooled position may be padding);
- ``flexible`` / ``mean`` (causal): only the real tokens;
- ``first`` (causal): only position 0.
"""

from __future__ import annotations

import torch
from torch import nn


class TrunkCache:
    """Per-split packed hidden states of ``embed`` + ``trf_blocks[:start_block]``."""

    def __init__(self, start_block: int, token: str = "last", causal: bool = True) -> None:
        self.start_block = start_block
        self.token = token
        self.causal = causal
        self._states: dict[str, torch.Tensor] = {}  # split -> [sum(stored), D]
        self._offsets: dict[str, torch.Tensor] = {}  # split -> [N + 1]

    def has(self, split: str) -> bool:
        return split in self._states

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._states.values())

    def _stored_lengths(self, token_ids: list[list[int]], max_length: int) -> list[int]:
        lengths = [max(1, min(len(t), max_length)) for t in token_ids]
        if not self.causal or self.token == "last":
            return [max_length] * len(lengths)
        if self.token == "first":
            return [1] * len(lengths)
        return lengths

    def estimate_bytes(self, dataset, model: nn.Module, max_length: int) -> int:
        emb_dim = model.tok_emb.weight.shape[1]
        stored = sum(self._stored_lengths(dataset.token_ids, max_length))
        return stored * emb_dim * 4

    @torch.no_grad()
    def build(
        self,
        split: str,
        model: nn.Module,
        dataset,
        max_length: int,
        pad_token_id: int,
        device: torch.device,
        batch_size: int = 32,
    ) -> None:
        """Run the trunk over ``dataset`` (in order, padded to ``max_length``) and keep its states."""
        was_training = model.training
        model.eval()
        token_ids = dataset.token_ids
        stored = self._stored_lengths(token_ids, max_length)
        chunks = []
        for start in range(0, len(token_ids), batch_size):
            rows = token_ids[start : start + batch_size]
            ids = torch.full((len(rows), max_length), pad_token_id, dtype=torch.long)
            for i, row in enumerate(rows):
                row = row[:max_length]
                ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            x = model.run_blocks(model.embed(ids.to(device)), start=0, end=self.start_block)
            x = x.float()
            for i in range(len(rows)):
                chunks.append(x[i, : stored[start + i]])
        model.train(was_training)
        self._states[split] = torch.cat(chunks) if chunks else torch.empty(0)
        offsets = torch.zeros(len(stored) + 1, dtype=torch.long)
        offsets[1:] = torch.cumsum(torch.tensor(stored, dtype=torch.long), 0)
        self._offsets[split] = offsets

    def lookup(
        self, split: str, index: torch.Tensor, width: int, device: torch.device | None = None
    ) -> torch.Tensor:
        """States ``[B, width, D]`` for examples ``index`` of ``split``; unread tail positions are 0."""
        states, offsets = self._states[split], self._offsets[split]
        idx = index.cpu()
        out = states.new_zeros((len(idx), width, states.shape[-1]))
        for row, i in enumerate(idx.tolist()):
            begin, end = int(offsets[i]), int(offsets[i + 1])
            n = min(end - begin, width)
            out[row, :n] = states[begin : begin + n]
        return out.to(device) if device is not None else out
