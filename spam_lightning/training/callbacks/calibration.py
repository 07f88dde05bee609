"""After the final evaluation: temperature scaling and the decision threshold fitted on the
validation split (``spam_lightning/calibration.py``), the ECE before and after, and the
reliability diagram (``reliability.png`` in the run folder and TensorBoard's ``calibration/``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger

from spam_lightning import calibration
from spam_lightning.training.checks import ConfigError

FIGURE = "reliability.png"


class Calibration(L.Callback):
    """``operating_point`` (for the bundle) and ``metrics`` (for metrics.json) once the final
    ``trainer.test`` has the module's ``test_results``; None before, or for a family that trains
    without it (baselines: temperature 1, argmax, as before)."""

    def __init__(self, output_dir: str | Path, max_fpr: float | None = None, temperature: bool = True,
                 bins: int = calibration.DEFAULT_BINS) -> None:
        self.output_dir, self.max_fpr, self.temperature, self.bins = Path(output_dir), max_fpr, temperature, bins
        self.operating_point: calibration.OperatingPoint | None = None
        self.metrics: dict[str, Any] | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """A threshold on data whose classes were unknown before it was read (a CSV): refused
        before training."""
        count = getattr(pl_module, "num_classes", None)
        if problems := calibration.threshold_problems(self.max_fpr, count):
            raise ConfigError("Invalid configuration:\n  - " + "\n  - ".join(problems))

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        results = getattr(pl_module, "test_results", None)
        val = results.outputs.get("val") if results is not None else None
        if val is None or len(val["labels"]) == 0:
            return
        test = results.outputs.get("test") or {}
        self.operating_point, self.metrics = calibration.fit(
            val["probs"].float(), val["labels"], test.get("probs"), test.get("labels"),
            max_fpr=self.max_fpr, temperature=self.temperature, bins=self.bins)
        self._positive = results.class_names[calibration.POSITIVE] if len(results.class_names) > 1 else ""
        if trainer.is_global_zero:
            self._draw(trainer, val)

    def summary(self) -> str | None:
        """One line for the log after the chapter's final lines (train.py), or None."""
        if (m := self.metrics) is None:
            return None
        decision = ("argmax" if m["threshold"] is None else
                    f"P({self._positive}) >= {m['threshold']:.4g} (threshold.max_fpr={self.max_fpr})")
        return (f"Calibration: temperature {m['temperature']:.4g}, validation ECE {m['val_ece'] * 100:.2f}% "
                f"-> {m['val_ece_calibrated'] * 100:.2f}% ({self.bins} bins); decision: {decision}")

    def _draw(self, trainer: L.Trainer, val: dict[str, Any]) -> None:
        from spam_lightning.training.plots import draw_reliability, plt

        probs, labels, t = val["probs"].float(), val["labels"], self.metrics["temperature"]
        fig = draw_reliability(calibration.reliability(probs, labels, self.bins),
                               calibration.reliability(calibration.apply(probs, t), labels, self.bins),
                               self.metrics["val_ece"], self.metrics["val_ece_calibrated"], t,
                               low=1 / probs.shape[1])
        self.output_dir.mkdir(parents=True, exist_ok=True)
        from spam_lightning.io_utils import atomic_write

        atomic_write(self.output_dir / FIGURE, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
        for lg in trainer.loggers:
            if isinstance(lg, TensorBoardLogger):
                lg.experiment.add_figure("calibration/reliability", fig, global_step=trainer.global_step,
                                         close=False)
                lg.experiment.add_scalar("calibration/temperature", self.metrics["temperature"],
                                         trainer.global_step)
                lg.experiment.flush()
        plt.close(fig)
