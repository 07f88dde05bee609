"""Pooling (``token=NAME``): the final hidden states ``[B, T, D]`` to one vector per message.

A pooling declares which positions it ``reads``: ``ALL`` (padding included), the ``REAL`` tokens,
the ``LAST_REAL`` one or a position k (an int; negative from the end of the padded row); the
rest (``span``, ``positions``, ``reads_padding``, ``unpadded``) is derived. A subclass with a
``name`` registers itself; ``conf/token/NAME.yaml`` points at it with ``_target_``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

ALL, REAL, LAST_REAL = "all", "real", "last_real"
POOLINGS: dict[str, type[Pooling]] = {}  # name -> class, in the order the classes are defined


class Pooling:
    """Subclasses set ``name``, ``reads`` and, unless they read one position, ``__call__``."""

    name: ClassVar[str]
    reads: ClassVar[str | int]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in vars(cls):
            POOLINGS[cls.name] = cls

    def __init__(self, name: str | None = None) -> None:  # `name`: the yaml's, which must match
        if name is not None and name != self.name:
            raise ValueError(f"token.name={name!r} does not match its _target_ {type(self).__name__} "
                             f"(named {self.name!r})")

    def __call__(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``[B, T, D]`` -> ``[B, D]``; ``lengths`` [B]: the real tokens (right padding after)."""
        positions = self.positions(x.shape[1], lengths.to(x.device))
        if positions is None:
            raise NotImplementedError(f"{type(self).__name__} reads several positions: define __call__")
        return x[torch.arange(x.shape[0], device=x.device), positions]

    @classmethod
    def reads_padding(cls) -> bool:
        """Whether the result can depend on right padding (then per-batch padding is not exact)."""
        return cls.reads == ALL or (isinstance(cls.reads, int) and cls.reads != 0)

    def span(self, width: int, lengths: torch.Tensor) -> torch.Tensor:
        """Per row, how many leading positions the result depends on under a causal mask."""
        if self.reads in (REAL, LAST_REAL):
            return lengths.clamp(1, width)
        if isinstance(self.reads, int) and self.reads >= 0:
            return torch.full_like(lengths, min(self.reads + 1, width))
        return torch.full_like(lengths, width)

    def positions(self, width: int, lengths: torch.Tensor) -> torch.Tensor | None:
        """The one position each row reads, or None when it reads several."""
        if self.reads == LAST_REAL:
            return (lengths.long() - 1).clamp(min=0, max=width - 1)
        if isinstance(self.reads, int):
            k = self.reads if self.reads >= 0 else width + self.reads
            return torch.full_like(lengths, k, dtype=torch.long)
        return None

    def unpadded(self) -> Pooling:
        """This pooling without padding (``data.padding=none``): its nearest named base class that
        never reads padding (``Last(Flexible)``: flexible), so inference can batch."""
        return next(c for c in type(self).__mro__ if issubclass(c, Pooling) and "name" in vars(c)
                    and not c.reads_padding())()


class Flexible(Pooling):
    """The last real (non-padding) token of each message."""

    name, reads = "flexible", LAST_REAL


class Last(Flexible):
    """The last position, -1, padding included (the chapter)."""

    name, reads = "last", -1


class First(Pooling):
    """The first position, 0 (exercise 6.3)."""

    name, reads = "first", 0


class MaskedMean(Pooling):
    """The average over the real tokens only: independent of the padding."""

    name, reads = "masked_mean", REAL

    def __call__(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        lengths = lengths.to(x.device)
        mask = torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]  # [B, T]
        summed = (x * mask.unsqueeze(-1).to(x.dtype)).sum(dim=1)
        return summed / lengths.clamp(min=1).unsqueeze(-1).to(x.dtype)


class Mean(MaskedMean):
    """The average over every position, padding included: the book's ``--average_embeddings``
    (``model(x).mean(dim=1)``, follow-up table row 19)."""

    name, reads = "mean", ALL

    def __call__(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1)


# the chapter's first, then the book's variants (the order of messages and docs)
for _name in ("last", "first", "flexible", "mean", "masked_mean"):
    POOLINGS[_name] = POOLINGS.pop(_name)


def pooling_names(section: Mapping[str, Any] | None = None) -> tuple[str, ...]:
    """The allowed ``token`` names, once ``section``'s ``_target_`` is imported (registered)."""
    if section is not None and section.get("_target_"):
        from hydra.utils import get_class

        get_class(section["_target_"])
    return tuple(POOLINGS)


def get_pooling(token: str | Pooling | Mapping[str, Any]) -> Pooling:
    """A pooling from its name, an instance, or its config group (``_target_`` and ``name``)."""
    if isinstance(token, Pooling):
        return token
    if isinstance(token, Mapping):
        if token.get("_target_"):
            from hydra.utils import get_class

            return get_class(token["_target_"])(name=token.get("name"))
        token = token.get("name")
    if token not in POOLINGS:
        raise ValueError(f"unknown token={token!r}; allowed: {', '.join(POOLINGS)}")
    return POOLINGS[token]()
