"""The chapter's monitoring (section 6.7): every ``eval_freq`` batches the loss, after each epoch
the accuracy, on ``eval_iter`` batches of the chapter's own loaders (so the global RNG advances as
in ``train_classifier_simple``), printed as the chapter does and kept for plots and checkpoints."""

from __future__ import annotations

import itertools
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only

from spam_lightning.run_log import echo


@torch.no_grad()
def _evaluate(pl_module, trainer, loader, num_batches: int) -> tuple[float, float]:
    """Mean loss and accuracy over the first ``num_batches`` batches of ``loader``."""
    losses, correct, seen = [], 0, 0
    with trainer.precision_plugin.forward_context():
        for batch in itertools.islice(loader, num_batches):
            batch = pl_module.transfer_batch_to_device(batch, pl_module.device, 0)
            loss, logits = pl_module.batch_loss(batch)
            losses.append(float(loss))
            correct += int((logits.argmax(-1) == batch["labels"]).sum())
            seen += int(batch["labels"].shape[0])
    mean_loss = sum(losses) / len(losses) if losses else float("nan")
    return mean_loss, (correct / seen if seen else float("nan"))


class ChapterMonitor(L.Callback):
    """Prints and records the chapter's periodic losses and per-epoch accuracies."""

    def __init__(self, eval_freq: int = 50, eval_iter: int = 5) -> None:
        self.eval_freq, self.eval_iter = eval_freq, eval_iter
        self.examples_seen, self.batches_seen, self.training_seconds = 0, 0, 0.0
        self.history: dict[str, list[float]] = {k: [] for k in (
            "train_losses", "val_losses", "train_accs", "val_accs", "loss_examples_seen", "acc_examples_seen")}
        self._t0: float | None = None
        self._book_loaders = None

    def state_dict(self) -> dict[str, Any]:
        return {"examples_seen": self.examples_seen, "batches_seen": self.batches_seen,
                "training_seconds": self.training_seconds + self._elapsed(), "history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for key in ("examples_seen", "batches_seen", "training_seconds", "history"):
            setattr(self, key, state_dict[key])

    def _elapsed(self) -> float:
        return time.perf_counter() - self._t0 if self._t0 is not None else 0.0

    def on_fit_start(self, trainer, pl_module) -> None:
        # from the start of fitting: the frozen-trunk cache built before the first epoch is
        # training time too (the book's loop recomputes those blocks in every step)
        self._t0 = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        self.training_seconds += self._elapsed()
        self._t0 = None

    def _evaluate_both(self, trainer, pl_module) -> tuple[tuple[float, float], tuple[float, float]]:
        """(loss, accuracy) on the first ``eval_iter`` train and validation batches, in eval mode."""
        # made once like the book's: each iter() draws from the global RNG what the book's does
        if self._book_loaders is None:
            self._book_loaders = (trainer.datamodule.book_dataloader("train"),
                                  trainer.datamodule.book_dataloader("val"))
        pl_module.eval()
        train, val = [_evaluate(pl_module, trainer, loader, self.eval_iter)
                      for loader in self._book_loaders]
        pl_module.train()
        return train, val

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # every rank trains on its own batch of the same size: count the whole step
        n = int(batch["labels"].shape[0]) * trainer.world_size
        self.examples_seen += n
        self.batches_seen += 1
        pl_module.log("examples_seen", float(self.examples_seen), on_step=True, on_epoch=False)
        if (self.batches_seen - 1) % self.eval_freq != 0:
            return
        (train_loss, _), (val_loss, _) = self._evaluate_both(trainer, pl_module)
        self._record(train_losses=train_loss, val_losses=val_loss, loss_examples_seen=self.examples_seen)
        self._log(trainer, {"chapter/train_loss": train_loss, "chapter/val_loss": val_loss})
        self._print(f"Ep {trainer.current_epoch + 1} (Step {self.batches_seen - 1:06d}): "
                    f"Train loss {train_loss:.3f}, Val loss {val_loss:.3f}")

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        (_, train_acc), (_, val_acc) = self._evaluate_both(trainer, pl_module)
        self._record(train_accs=train_acc, val_accs=val_acc, acc_examples_seen=self.examples_seen)
        self._log(trainer, {"chapter/train_acc": train_acc, "chapter/val_acc": val_acc})
        self._print(f"Training accuracy: {train_acc * 100:.2f}% | Validation accuracy: {val_acc * 100:.2f}%")

    def _log(self, trainer, metrics: dict[str, float]) -> None:
        """Into the loggers once, at the step evaluated (the printout's ``Step``; the last batch's
        for the epoch's accuracies): ``pl_module.log`` would repeat the last value at every
        ``log_every_n_steps`` (a staircase) and place it at that interval's step."""
        for logger in trainer.loggers:  # each logs on rank 0 only
            logger.log_metrics(metrics, step=self.batches_seen - 1)

    def _record(self, **values: float) -> None:
        for key, value in values.items():
            self.history[key].append(value)

    @rank_zero_only
    def _print(self, line: str) -> None:
        echo(line, __name__)  # the terminal's line, and train.log's
