"""What a difference between runs is worth on a few hundred test messages: a bootstrap interval
on accuracy and McNemar's exact test on two runs' paired predictions (scipy, the ``stats`` extra)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

PREDICTIONS = "predictions.csv"
ALPHA = 0.05


class StatsError(ValueError):
    """Predictions that cannot be compared; the message names the file and the fix."""


def _scipy_stats():
    try:
        from scipy import stats
    except ImportError as err:
        raise StatsError('this needs scipy: pip install "spam-lightning[stats]"') from err
    return stats


def accuracy_interval(correct: np.ndarray, level: float = 0.95, seed: int = 0,
                      resamples: int = 10_000) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``correct`` (0/1 per message)."""
    correct = np.asarray(correct, dtype=float)
    if correct.min() == correct.max():  # all right or all wrong: no spread to resample
        return float(correct[0]), float(correct[0])
    result = _scipy_stats().bootstrap((correct,), np.mean, confidence_level=level, method="percentile",
                                      n_resamples=resamples, random_state=seed, vectorized=True)
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value: the discordant messages as a binomial test at 1/2."""
    n = only_a + only_b
    return 1.0 if n == 0 else float(_scipy_stats().binomtest(min(only_a, only_b), n, 0.5).pvalue)


@dataclass
class Comparison:
    """Two runs on the same messages: accuracies, the messages only one gets right, the p-value."""

    n: int
    accuracy_a: float
    accuracy_b: float
    only_a: int  # A right, B wrong
    only_b: int  # B right, A wrong
    p_value: float
    flips: pd.DataFrame

    @property
    def verdict(self) -> str:
        if self.p_value >= ALPHA:
            return f"within noise (p = {self.p_value:.3g})"
        better = "B" if self.only_b > self.only_a else "A"
        return f"{better} better, p = {self.p_value:.3g}"


def read_predictions(folder: str | Path) -> pd.DataFrame:
    """A run folder's ``predictions.csv`` (a sweep job's folder is a run folder)."""
    path = Path(folder) / PREDICTIONS
    if not path.is_file():
        raise StatsError(f"{path}: no such file; pass the folder of a finished run (runs write "
                         f"{PREDICTIONS} after their final evaluation)")
    return pd.read_csv(path)


def compare(a: pd.DataFrame, b: pd.DataFrame, split: str = "test") -> Comparison:
    """McNemar's exact test of ``b`` against ``a`` on ``split``'s messages, matched by row."""
    a, b = (p[p["split"] == split].set_index("row") for p in (a, b))
    if a.empty or set(a.index) != set(b.index):
        raise StatsError(f"the two runs did not predict the same {split} messages ({len(a)} vs {len(b)} "
                         "rows); compare runs of the same data and split settings")
    b = b.loc[a.index]
    if not (a["label"] == b["label"]).all():
        raise StatsError(f"the {split} labels differ between the runs; compare runs of the same data")
    right_a, right_b = a["predicted"] == a["label"], b["predicted"] == b["label"]
    flips = pd.DataFrame({"row": a.index, "label": a["label"], "a": a["predicted"], "b": b["predicted"],
                          "text": a["text"] if "text" in a else ""})
    flips = flips[(right_a != right_b).to_numpy()].reset_index(drop=True)
    only_a, only_b = int((right_a & ~right_b).sum()), int((right_b & ~right_a).sum())
    return Comparison(len(a), float(right_a.mean()), float(right_b.mean()), only_a, only_b,
                      mcnemar_exact(only_a, only_b), flips)
