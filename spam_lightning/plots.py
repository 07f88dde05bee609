"""The chapter's plots (section 6.7): epochs below, examples seen above, on twin x axes."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: training runs headless
import matplotlib.pyplot as plt  # noqa: E402


def plot_values(
    num_epochs: int,
    examples_seen: int,
    train_values: list[float],
    val_values: list[float],
    label: str,
    out_dir: str | Path,
) -> list[Path]:
    """Write ``{label}-plot.pdf`` and ``.png`` as the chapter's ``plot_values`` draws them."""
    out_dir = Path(out_dir)
    n = len(train_values)
    step = num_epochs / (n - 1) if n > 1 else 0.0
    epochs = [i * step for i in range(n)]
    seen = [examples_seen * i / (n - 1) if n > 1 else 0.0 for i in range(n)]
    fig, ax1 = plt.subplots(figsize=(5, 3))
    ax1.plot(epochs, train_values, label=f"Training {label}")
    ax1.plot(epochs, val_values, linestyle="-.", label=f"Validation {label}")
    ax1.set_xlabel("Epochs")
    ax1.set_ylabel(label.capitalize())
    ax1.legend()
    ax2 = ax1.twiny()  # the second x axis: examples seen, aligned with the epochs
    ax2.plot(seen, train_values, alpha=0)
    ax2.set_xlabel("Examples seen")
    fig.tight_layout()
    paths = []
    for ext in ("pdf", "png"):
        path = out_dir / f"{label}-plot.{ext}"
        fig.savefig(path, dpi=120 if ext == "png" else None)
        paths.append(path)
    plt.close(fig)
    return paths
