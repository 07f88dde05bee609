"""Length-grouped batches for ``data.padding=batch``: little padding, yet still shuffled."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch
from torch.utils.data import BatchSampler, Sampler


class LengthGroupedSampler(BatchSampler):
    """A ``batch_sampler`` that groups examples of similar length.

    Each epoch: take the index order of ``sampler`` (a ``RandomSampler``; under DDP Lightning
    swaps in a ``DistributedSampler``, which is why this is a ``BatchSampler`` with a
    ``sampler`` argument), drop the tail that would form an incomplete batch (when
    ``drop_last``: random examples, as ``DataLoader(shuffle=True, drop_last=True)`` drops, not
    the shortest), cut the rest into mega-chunks of ``mega_batch_mult * batch_size``, sort each
    chunk by length, cut it into batches and shuffle the order of all batches with
    ``generator``. Every kept example appears exactly once per epoch; epochs differ, and the
    whole sequence is reproducible from the seeds.
    """

    def __init__(
        self,
        sampler: Sampler[int] | Iterable[int],
        batch_size: int,
        drop_last: bool,
        lengths: Sequence[int],
        mega_batch_mult: int = 50,
        generator: torch.Generator | None = None,
        seed: int = 123,
    ) -> None:
        super().__init__(sampler, batch_size, drop_last)
        if mega_batch_mult < 1:
            raise ValueError(f"mega_batch_mult={mega_batch_mult}: must be >= 1")
        self.lengths = [int(n) for n in lengths]
        self.mega_batch_mult = mega_batch_mult
        self.generator = generator if generator is not None else torch.Generator().manual_seed(seed)
        self.seed = seed

    def __iter__(self) -> Iterator[list[int]]:
        bs = self.batch_size
        order = list(self.sampler)
        if self.drop_last:
            order = order[: len(order) - len(order) % bs]
        chunk = self.mega_batch_mult * bs
        batches: list[list[int]] = []
        for start in range(0, len(order), chunk):
            group = sorted(order[start : start + chunk], key=self.lengths.__getitem__, reverse=True)
            batches.extend(group[j : j + bs] for j in range(0, len(group), bs))
        for k in torch.randperm(len(batches), generator=self.generator).tolist():
            yield batches[k]
