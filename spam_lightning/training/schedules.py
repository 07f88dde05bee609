"""Learning-rate schedules (``conf/scheduler/*.yaml``, ``scheduler=none|linear_warmup|cosine``):
each builds a ``torch.optim.lr_scheduler.LambdaLR`` for the run's optimizer and its number of
optimizer steps, stepped after every optimizer step. The factor is a closed formula of the step
(Hugging Face's ``get_linear_schedule_with_warmup`` / ``get_cosine_schedule_with_warmup``), so a
resume, which restores the step count, continues exactly. The number of steps is asked for at the
first step that needs it (``trainer.estimated_stepping_batches`` once training runs: asked in
``configure_optimizers`` it would fix the training loader before the frozen-trunk cache replaces it)."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler


@dataclass
class Constant:
    """``scheduler=none``: ``optimizer.lr`` at every step (the chapter): no scheduler at all."""

    name: ClassVar[str] = "none"

    def problems(self) -> list[str]:
        return []

    def build(self, optimizer: torch.optim.Optimizer,
              total_steps: int | Callable[[], int]) -> LRScheduler | None:
        return None


def _once(value: int | Callable[[], int]) -> Callable[[], int]:
    """``value``, or what calling it returns the first time (asked once, then kept)."""
    kept: list[int] = [] if callable(value) else [int(value)]

    def get() -> int:
        if not kept:
            kept.append(int(value()))  # type: ignore[operator]
        return kept[0]

    return get


@dataclass
class LinearWarmup(Constant):
    """From 0 up to ``optimizer.lr`` over the warmup steps, then linearly down to 0 at the last."""

    name: ClassVar[str] = "linear_warmup"
    warmup_steps: Any = None
    warmup_fraction: Any = 0.1

    def problems(self) -> list[str]:
        from spam_lightning.rules import is_int

        problems = []
        if self.warmup_steps is not None and not is_int(self.warmup_steps, 0):
            problems.append(f"scheduler.warmup_steps={self.warmup_steps!r}: must be an integer >= 0 "
                            f"(optimizer steps), or null to use scheduler.warmup_fraction")
        fraction = self.warmup_fraction
        if not (isinstance(fraction, int | float) and not isinstance(fraction, bool)
                and 0 <= fraction <= 1):
            problems.append(f"scheduler.warmup_fraction={fraction!r}: must be a number in [0, 1] "
                            f"(the share of all optimizer steps spent warming up)")
        return problems

    def warmup(self, total_steps: int) -> int:
        """Warmup steps: ``warmup_steps``, else ``ceil(warmup_fraction * total_steps)`` (as HF)."""
        if self.warmup_steps is not None:
            return int(self.warmup_steps)
        return math.ceil(float(self.warmup_fraction) * total_steps)

    @staticmethod
    def decay(progress: float) -> float:
        """The factor after warmup, ``progress`` from 0 (end of warmup) to 1 (the last step)."""
        return max(0.0, 1.0 - progress)

    def factor(self, step: int, warmup: int, total_steps: int) -> float:
        """The learning rate at optimizer step ``step`` (0-based) over ``optimizer.lr``."""
        if step < warmup:
            return step / warmup
        return self.decay((step - warmup) / max(1, total_steps - warmup))

    def at(self, step: int, total_steps: Callable[[], int]) -> float:
        """``factor`` at ``step``; step 0's (what LambdaLR sets when built) needs no step count:
        0 with any warmup, else 1."""
        total = total_steps() if step > 0 else 1
        return self.factor(step, self.warmup(total), total)

    def build(self, optimizer: torch.optim.Optimizer,
              total_steps: int | Callable[[], int]) -> LRScheduler:
        # a partial keeps nothing in LambdaLR's state_dict (its __dict__ is empty): checkpoints
        # hold the step count only, and load with weights_only
        return LambdaLR(optimizer, functools.partial(self.at, total_steps=_once(total_steps)))


@dataclass
class Cosine(LinearWarmup):
    """Warmup as ``linear_warmup``, then half a cosine from ``optimizer.lr`` down to 0."""

    name: ClassVar[str] = "cosine"
    warmup_fraction: Any = 0.0

    @staticmethod
    def decay(progress: float) -> float:
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))
