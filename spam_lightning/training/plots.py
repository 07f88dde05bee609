"""The chapter's plots (section 6.7): epochs below, examples seen above, on twin x axes."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: training runs headless
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

# Up to this many points per series are drawn with markers: one or a few points (a 1-epoch
# accuracy plot has one per series) are invisible as a bare line; hundreds are a line.
MAX_MARKED_POINTS = 60


def draw_values(num_epochs: int, examples_seen: int, train_values: list[float],
                val_values: list[float], label: str) -> Figure:
    """The figure of ``plot_values``: the values spread evenly over ``num_epochs``."""
    n = len(train_values)
    epochs = [i * num_epochs / (n - 1) for i in range(n)] if n > 1 else [0.0]
    style = {"marker": "o", "markersize": 6 if n <= 10 else 3} if n <= MAX_MARKED_POINTS else {}
    fig, ax1 = plt.subplots(figsize=(5, 3))
    ax1.plot(epochs, train_values, label=f"Training {label}", **style)
    ax1.plot(epochs, val_values, linestyle="-.", label=f"Validation {label}", **style)
    if n == 1:  # a single point: span the epochs run, with a margin so the point is not clipped
        span = max(num_epochs, 1)
        ax1.set_xlim(-0.05 * span, 1.05 * span)
    ax1.set(xlabel="Epochs", ylabel=label.capitalize())
    ax1.legend()
    ax2 = ax1.twiny()  # the second x axis: examples seen, aligned with the epochs
    per_epoch = examples_seen / max(num_epochs, 1)
    low, high = ax1.get_xlim()
    ax2.set(xlim=(low * per_epoch, high * per_epoch), xlabel="Examples seen")
    fig.tight_layout()
    return fig


def plot_values(num_epochs: int, examples_seen: int, train_values: list[float],
                val_values: list[float], label: str, out_dir: str | Path) -> list[Path]:
    """Write ``{label}-plot.pdf`` and ``.png`` as the chapter's ``plot_values`` draws them."""
    fig = draw_values(num_epochs, examples_seen, train_values, val_values, label)
    paths = [Path(out_dir) / f"{label}-plot.{ext}" for ext in ("pdf", "png")]
    for path in paths:
        fig.savefig(path, dpi=120 if path.suffix == ".png" else None)
    plt.close(fig)
    return paths


def draw_reliability(before: dict[str, list[float]], after: dict[str, list[float]],
                     ece_before: float, ece_after: float, temperature: float,
                     split: str = "validation", low: float = 0.0) -> Figure:
    """The reliability diagram (``calibration.reliability``'s bins): accuracy per confidence bin
    before and after temperature scaling, beside the diagonal of perfect calibration; the bar
    widths are the bins'. Empty bins are left out; ``low``: the lowest possible confidence
    (1 / classes), where the x axis starts."""
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    width = before["centre"][1] - before["centre"][0] if len(before["centre"]) > 1 else 1.0
    for bins, label, shift, colour in (
        (before, f"before (ECE {ece_before * 100:.2f}%)", -width / 4, "tab:red"),
        (after, f"T = {temperature:.3g} (ECE {ece_after * 100:.2f}%)", width / 4, "tab:blue"),
    ):
        shown = [i for i, n in enumerate(bins["count"]) if n > 0]
        ax.bar([bins["centre"][i] + shift for i in shown], [bins["accuracy"][i] for i in shown],
               width=width / 2, color=colour, alpha=0.75, edgecolor="black", linewidth=0.5,
               label=label)
    ax.plot([low, 1], [low, 1], linestyle="--", color="gray", label="perfect calibration")
    ax.set(xlim=(max(0.0, low - width / 2), 1), ylim=(0, 1), xlabel="Confidence (top class)", ylabel="Accuracy",
           title=f"Reliability, {split} set")
    ax.legend(loc="upper left", fontsize="small")
    fig.tight_layout()
    return fig
