"""The chapter's plots stay readable from 1 point per series (a 1-epoch accuracy plot) to 1,000."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pytest

from spam_lightning.training.plots import MAX_MARKED_POINTS, draw_values, plot_values


@pytest.mark.parametrize("n", [1, 2, 6, MAX_MARKED_POINTS, MAX_MARKED_POINTS + 1, 1000])
def test_every_point_is_drawn_inside_the_axes(n: int) -> None:
    train = [0.5 + 0.4 * i / max(n - 1, 1) for i in range(n)]
    val = [v - 0.05 for v in train]
    fig = draw_values(1 if n == 1 else 5, 1000 * n, train, val, "accuracy")
    ax = fig.axes[0]
    lines = ax.get_lines()
    assert [line.get_label() for line in lines] == ["Training accuracy", "Validation accuracy"]
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    for line in lines:
        xs, ys = line.get_xdata(), line.get_ydata()
        assert len(xs) == n
        # strictly inside: a lone point on the axis edge is clipped in half
        assert all(x0 < x < x1 for x in xs) and all(y0 < y < y1 for y in ys)
        if n <= MAX_MARKED_POINTS:
            assert line.get_marker() == "o", "few points need markers to be visible"
        else:
            assert line.get_marker() in ("None", "", None), "dense series are plain lines"
    plt.close(fig)


def test_twin_axis_maps_epochs_to_examples_seen() -> None:
    fig = draw_values(5, 7470, [1.0, 0.5, 0.2], [1.1, 0.6, 0.3], "loss")
    ax1, ax2 = fig.axes
    assert ax2.get_xlim() == pytest.approx(tuple(x * 7470 / 5 for x in ax1.get_xlim()))
    plt.close(fig)


def test_plot_values_writes_pdf_and_png(tmp_path: Path) -> None:
    paths = plot_values(1, 1040, [0.7], [0.65], "accuracy", tmp_path)
    assert [p.name for p in paths] == ["accuracy-plot.pdf", "accuracy-plot.png"]
    assert paths[1].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert paths[0].read_bytes()[:5] == b"%PDF-"
