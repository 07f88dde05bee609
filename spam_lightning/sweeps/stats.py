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


def correct_matrix(runs: list[pd.DataFrame], split: str = "test") -> np.ndarray:
    """``[seeds, messages]`` of 0/1 (message order: ``row``) for runs of one configuration."""
    parts = [p[p["split"] == split].sort_values("row") for p in runs]
    if len({tuple(p["row"]) for p in parts}) != 1:
        raise StatsError(f"the seeds of one row predicted different {split} messages")
    return np.stack([(p["predicted"] == p["label"]).to_numpy(dtype=float) for p in parts])


def _resampled_means(correct: np.ndarray, rng: np.random.Generator, resamples: int,
                     messages: np.ndarray | None = None) -> np.ndarray:
    """Bootstrap means over seeds, then messages within each (the two sources of noise; scipy's
    ``bootstrap`` resamples one level only). ``messages``: shared indices (paired rows)."""
    seeds, n = correct.shape
    pick = rng.integers(seeds, size=(resamples, seeds))
    if messages is None:
        messages = rng.integers(n, size=(resamples, n))
    return correct[pick[:, :, None], messages[:, None, :]].mean(axis=(1, 2))


def row_interval(correct: np.ndarray, level: float = 0.95, seed: int = 0,
                 resamples: int = 2_000) -> tuple[float, float]:
    """A row's interval on accuracy: over messages, and over seeds when it has several."""
    if correct.shape[0] == 1:
        return accuracy_interval(correct[0], level, seed)
    means = _resampled_means(correct, np.random.default_rng(seed), resamples)
    return tuple(float(q) for q in np.quantile(means, [(1 - level) / 2, (1 + level) / 2]))


def row_verdict(base: np.ndarray, other: np.ndarray, seed: int = 0, resamples: int = 2_000) -> str:
    """``other`` against the baseline row on the same messages: McNemar's exact test for one
    seed each, else a paired bootstrap (same messages, seeds resampled per row) of the difference."""
    if base.shape[1] != other.shape[1]:
        return "not comparable (other messages)"
    if base.shape[0] == other.shape[0] == 1:
        only_base = int(((base[0] == 1) & (other[0] == 0)).sum())
        only_other = int(((other[0] == 1) & (base[0] == 0)).sum())
        p = mcnemar_exact(only_base, only_other)
        if p >= ALPHA:
            return f"within noise (p = {p:.3g})"
        return f"{'better' if only_other > only_base else 'worse'}, p = {p:.3g}"
    rng = np.random.default_rng(seed)
    messages = rng.integers(base.shape[1], size=(resamples, base.shape[1]))
    diff = _resampled_means(other, rng, resamples, messages) - _resampled_means(base, rng, resamples, messages)
    low, high = np.quantile(diff, [ALPHA / 2, 1 - ALPHA / 2])
    span = f"{100 * (other.mean() - base.mean()):+.2f} points [95% CI {100 * low:+.2f}, {100 * high:+.2f}]"
    return f"within noise ({span})" if low <= 0 <= high else f"{'better' if low > 0 else 'worse'} ({span})"
