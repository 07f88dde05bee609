"""Frozen-trunk cache: the hidden states after the frozen blocks, computed once per example
(the chapter recomputes them for every batch of every epoch and every evaluation).

Exact: with a causal mask position t depends only on positions <= t, so a prefix's states do
not depend on padding. What is stored per example is what the pooled token can read: ``last``
and the book's ``mean`` (padding included), every position up to ``max_length`` (computed
padded, as in the chapter); ``flexible``/``masked_mean``, the real tokens (computed in
length-sorted batches); ``first``, position 0; without a causal
mask, the whole ``max_length`` (cached only under ``longest`` padding).

States are packed per split as ``[sum(stored lengths), emb_dim]`` with offsets, so ``lookup`` is
one gather. Indices are row numbers in the split, as a distributed sampler hands them out: every
rank builds the whole cache and can look up any example.
"""

from __future__ import annotations

import torch
from torch import nn


class TrunkCacheError(ValueError):
    """``cache.trunk=true`` asks for a cache that is impossible (or over the memory budget)."""


class TrunkCache:
    """Per-split packed hidden states of ``embed`` + ``trf_blocks[:start_block]``, stored as
    ``dtype`` (float32: the residual stream stays float32 under bf16-mixed autocast)."""

    def __init__(
        self, start_block: int, token: str = "last", causal: bool = True,
        dtype: torch.dtype = torch.float32, max_batch_tokens: int = 4096,
    ) -> None:
        self.start_block = start_block
        self.token = token
        self.causal = causal
        self.dtype = dtype
        self.max_batch_tokens = max_batch_tokens
        self._states: dict[str, torch.Tensor] = {}  # split -> [sum(stored), D]
        self._offsets: dict[str, torch.Tensor] = {}  # split -> [N + 1], on the states' device
        self._stored: dict[str, torch.Tensor] = {}  # split -> [N] stored positions per example

    def has(self, split: str) -> bool:
        return split in self._states

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._states.values())

    def _stored_lengths(self, token_ids: list[list[int]], max_length: int) -> list[int]:
        lengths = [max(1, min(len(t), max_length)) for t in token_ids]
        if not self.causal or self.token in ("last", "mean"):  # read every position
            return [max_length] * len(lengths)
        if self.token == "first":
            return [1] * len(lengths)
        return lengths

    def estimate_bytes(self, dataset, model: nn.Module, max_length: int) -> int:
        emb_dim = model.tok_emb.weight.shape[1]
        stored = sum(self._stored_lengths(dataset.token_ids, max_length))
        return stored * emb_dim * torch.empty((), dtype=self.dtype).element_size()

    def _batches(self, stored: list[int]) -> list[list[int]]:
        """Example indices in trunk batches, shortest first (nearly no padding). A batch closes
        past ``max_batch_tokens`` padded positions or ~15% padding (sparse length ranges)."""
        order = sorted(range(len(stored)), key=stored.__getitem__)
        batches: list[list[int]] = []
        current: list[int] = []
        real = 0
        for i in order:
            width = stored[i]  # ascending: the new row is the widest
            padded = width * (len(current) + 1)
            if current and (
                padded > self.max_batch_tokens
                or (padded > 1.15 * (real + width) and width * len(current) >= 512)
            ):
                batches.append(current)
                current, real = [], 0
            current.append(i)
            real += width
        if current:
            batches.append(current)
        return batches

    @torch.no_grad()
    def build(
        self, split: str, model: nn.Module, dataset, max_length: int, pad_token_id: int,
        device: torch.device,
    ) -> None:
        """Run the trunk over ``dataset`` and keep, per example, the states the pooled token
        can read, each computed padded to the width it stores (what the uncached forward sees)."""
        was_training = model.training
        model.eval()
        token_ids = dataset.token_ids
        stored = self._stored_lengths(token_ids, max_length)
        emb_dim = model.tok_emb.weight.shape[1]
        stored_t = torch.tensor(stored, dtype=torch.long)
        offsets = torch.zeros(len(stored) + 1, dtype=torch.long)
        offsets[1:] = torch.cumsum(stored_t, 0)
        states = torch.empty((int(offsets[-1]), emb_dim), dtype=self.dtype, device=device)
        for rows in self._batches(stored):
            width = max(stored[i] for i in rows)
            ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
            for r, i in enumerate(rows):
                seq = token_ids[i][:width]
                ids[r, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
            x = model.run_blocks(model.embed(ids.to(device)), start=0, end=self.start_block)
            n = stored_t[rows]  # [b] positions kept per row (all of them for `last`)
            keep = torch.arange(width)[None, :] < n[:, None]  # [b, width]
            dest = torch.repeat_interleave(offsets[rows], n) + (
                torch.arange(int(n.sum())) - torch.repeat_interleave(torch.cumsum(n, 0) - n, n)
            )
            states.index_copy_(0, dest.to(device), x[keep.to(device)].to(self.dtype))
        model.train(was_training)
        self._states[split] = states
        self._offsets[split] = offsets.to(device)
        self._stored[split] = stored_t.to(device)

    def lookup(
        self, split: str, index: torch.Tensor, width: int, device: torch.device | None = None
    ) -> torch.Tensor:
        """States ``[B, width, D]`` for examples ``index`` of ``split``, in one gather; positions
        past an example's stored length (never read by the pooled token) are 0."""
        states = self._states[split]
        idx = index.to(states.device, torch.long)
        begin = self._offsets[split][idx]  # [B]
        count = self._stored[split][idx].clamp(max=width)  # [B]
        pos = torch.arange(width, device=states.device)
        valid = pos[None, :] < count[:, None]  # [B, width]
        flat = torch.where(valid, begin[:, None] + pos[None, :], 0)
        out = states[flat].masked_fill_(~valid.unsqueeze(-1), 0)
        return out.to(device) if device is not None else out

    def to(self, device: torch.device | str) -> TrunkCache:
        """Move every split's states to ``device`` (e.g. after the module moved); returns self."""
        for table in (self._states, self._offsets, self._stored):
            for split, tensor in table.items():
                table[split] = tensor.to(device)
        return self
