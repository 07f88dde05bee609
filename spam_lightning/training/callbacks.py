"""The chapter's monitoring (section 6.7) as a Lightning callback.

Every ``eval_freq`` batches: the loss on ``eval_iter`` train and validation batches. After each
epoch: the accuracy on ``eval_iter`` train and validation batches. Both print in the chapter's
format and are kept (with examples seen) for the plots and the checkpoint, so a resumed run
continues the same history.

Resuming also needs what no callback above holds: the random number generators (``RNGState``)
and checkpoints that are never half-written nor unpickled unsafely (``SafeCheckpointIO``).
"""

from __future__ import annotations

import itertools
import random
import re
import time
import zipfile
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_only
from torchmetrics.functional.classification import multiclass_confusion_matrix

from spam_lightning.io_utils import atomic_write
from spam_lightning.model.weights import CheckpointError
from spam_lightning.training.plots import plt


@torch.no_grad()
def _evaluate(pl_module, trainer, loader, split: str, num_batches: int) -> tuple[float, float]:
    """Mean loss and accuracy over the first ``num_batches`` batches of ``loader``."""
    losses, correct, seen = [], 0, 0
    with trainer.precision_plugin.forward_context():
        for batch in itertools.islice(loader, num_batches):
            batch = pl_module.transfer_batch_to_device(batch, pl_module.device, 0)
            loss, logits = pl_module.batch_loss(batch, split)
            losses.append(float(loss))
            correct += int((logits.argmax(-1) == batch["labels"]).sum())
            seen += int(batch["labels"].shape[0])
    mean_loss = sum(losses) / len(losses) if losses else float("nan")
    return mean_loss, (correct / seen if seen else float("nan"))


class ChapterMonitor(L.Callback):
    """Prints and records the chapter's periodic losses and per-epoch accuracies."""

    def __init__(self, eval_freq: int = 50, eval_iter: int = 5) -> None:
        if eval_freq < 1 or eval_iter < 1:
            raise ValueError(f"eval_freq and eval_iter must be >= 1, got {eval_freq}, {eval_iter}")
        self.eval_freq = eval_freq
        self.eval_iter = eval_iter
        self.examples_seen = 0
        self.batches_seen = 0
        self.training_seconds = 0.0
        self.history: dict[str, list[float]] = {
            "train_losses": [], "val_losses": [], "train_accs": [], "val_accs": [],
            "loss_examples_seen": [], "acc_examples_seen": [],
        }
        self._t0: float | None = None

    # Lightning saves callback state in checkpoints: a resumed run keeps its history.
    def state_dict(self) -> dict[str, Any]:
        return {
            "examples_seen": self.examples_seen,
            "batches_seen": self.batches_seen,
            "training_seconds": self.training_seconds + self._elapsed(),
            "history": self.history,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.examples_seen = state_dict["examples_seen"]
        self.batches_seen = state_dict["batches_seen"]
        self.training_seconds = state_dict["training_seconds"]
        self.history = state_dict["history"]

    def _elapsed(self) -> float:
        return time.perf_counter() - self._t0 if self._t0 is not None else 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        self._t0 = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        self.training_seconds += self._elapsed()
        self._t0 = None

    def _loaders(self, trainer):
        # the same loader objects training uses: the chapter iterates its shuffled train loader
        return trainer.train_dataloader, trainer.datamodule.val_dataloader()

    def _evaluate_both(self, trainer, pl_module) -> tuple[tuple[float, float], tuple[float, float]]:
        """(loss, accuracy) on the first ``eval_iter`` train and validation batches, in eval mode."""
        train_loader, val_loader = self._loaders(trainer)
        pl_module.eval()
        train = _evaluate(pl_module, trainer, train_loader, "train", self.eval_iter)
        val = _evaluate(pl_module, trainer, val_loader, "val", self.eval_iter)
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
        self.history["train_losses"].append(train_loss)
        self.history["val_losses"].append(val_loss)
        self.history["loss_examples_seen"].append(self.examples_seen)
        pl_module.log_dict(
            {"chapter/train_loss": train_loss, "chapter/val_loss": val_loss},
            on_step=True, on_epoch=False,
        )
        self._print(
            f"Ep {trainer.current_epoch + 1} (Step {self.batches_seen - 1:06d}): "
            f"Train loss {train_loss:.3f}, Val loss {val_loss:.3f}"
        )

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        (_, train_acc), (_, val_acc) = self._evaluate_both(trainer, pl_module)
        self.history["train_accs"].append(train_acc)
        self.history["val_accs"].append(val_acc)
        self.history["acc_examples_seen"].append(self.examples_seen)
        pl_module.log_dict({"chapter/train_acc": train_acc, "chapter/val_acc": val_acc})
        self._print(
            f"Training accuracy: {train_acc * 100:.2f}% | Validation accuracy: {val_acc * 100:.2f}%"
        )

    @rank_zero_only
    def _print(self, line: str) -> None:
        print(line, flush=True)


class RNGState(L.Callback):
    """Saves the global random generators (torch, CUDA, numpy, ``random``) in each checkpoint and
    restores them on resume, so dropout and any other draw continue exactly as in an
    uninterrupted run (Lightning restores weights, optimizer and loops, but not these)."""

    def state_dict(self) -> dict[str, Any]:
        name, keys, pos, has_gauss, gauss = np.random.get_state()
        state: dict[str, Any] = {
            "torch": torch.get_rng_state(),
            "python": random.getstate(),
            # plain tensors and numbers: the checkpoint stays loadable with weights_only=True
            "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)),
                      "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)},
        }
        if torch.cuda.is_initialized():  # this process's device only: no context on the others
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        torch.set_rng_state(state_dict["torch"])
        random.setstate(state_dict["python"])
        n = state_dict["numpy"]
        np.random.set_state(
            (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
        )
        cuda = state_dict.get("cuda")
        if isinstance(cuda, torch.Tensor) and torch.cuda.is_available():
            torch.cuda.set_rng_state(cuda)


def load_checkpoint_safely(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` of a Lightning checkpoint, or a CheckpointError.

    Its unpickler rebuilds only tensors and plain containers, so a crafted pickle fails before
    any of its code runs; the error says why instead of torch's long unpickling message.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: no such file")
    try:
        checkpoint = torch.load(
            path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path)
        )
    except Exception as err:  # UnpicklingError for forbidden globals, anything for junk
        found = re.search(r"WeightsUnpickler error: (.+?)(?:\. Please|\n|$)", str(err))
        reason = found.group(1) if found else f"{type(err).__name__}: {str(err)[:200]}"
        raise CheckpointError(
            f"refusing to load checkpoint {path}: it is not a plain checkpoint of tensors and "
            f"containers ({reason}). Checkpoints are read only with torch.load(weights_only=True), "
            "because a pickle can run arbitrary code; resume only from checkpoints a training run "
            "wrote."
        ) from err
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise CheckpointError(
            f"checkpoint {path} is not a Lightning training checkpoint (no 'state_dict'); pass "
            "the checkpoints/last.ckpt of a run, or use model.checkpoint= for pretrained weights"
        )
    return checkpoint


class SafeCheckpointIO(TorchCheckpointIO):
    """Checkpoint files written atomically and read safely.

    Lightning's writer fills a temporary file in the system temp folder and then moves it,
    which is a copy when that folder is another file system: a SIGKILL can leave a truncated
    ``last.ckpt`` (and a stray multi-GB temp file). Here the temporary file sits next to the
    target and is renamed onto it, so a kill leaves the previous checkpoint intact. Reading is
    always ``weights_only=True``.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or "://" in str(path):  # remote or custom: Lightning's way
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))

    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        if "://" in str(path):
            return super().load_checkpoint(path, weights_only=True)
        return load_checkpoint_safely(path)


class TestDashboard(L.Callback):
    """After the final evaluation: confusion matrix, precision-recall curve and the misclassified
    test messages in TensorBoard, so a run can be inspected without writing code."""

    def __init__(self, split: str = "test", max_examples: int = 50) -> None:
        self.split = split
        self.max_examples = max_examples

    @rank_zero_only
    def on_test_end(self, trainer, pl_module) -> None:
        out = getattr(pl_module, "final_outputs", {}).get(self.split)
        writers = [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if out is None or not writers or len(out["labels"]) == 0:
            return
        names = list(pl_module.hparams.get("class_names") or range(pl_module.num_classes))
        names = [str(n) for n in names]
        probs, labels = out["probs"].float(), out["labels"]
        preds = probs.argmax(-1)
        confusion = multiclass_confusion_matrix(preds, labels, num_classes=len(names))
        figure = confusion_figure(confusion, names)
        texts = _split_texts(trainer, self.split)
        wrong = (preds != labels).nonzero().flatten().tolist()[: self.max_examples]
        rows = ["| # | true | predicted | p(predicted) | message |", "|---|---|---|---|---|"]
        for i in wrong:
            idx = int(out["index"][i])
            text = texts[idx] if texts is not None and idx < len(texts) else f"example {idx}"
            text = text.replace("|", "\\|").replace("\n", " ")
            rows.append(
                f"| {idx} | {names[int(labels[i])]} | {names[int(preds[i])]} | "
                f"{float(probs[i, preds[i]]):.3f} | {text} |"
            )
        if not wrong:
            rows.append("| | | | | no misclassified messages |")
        step = trainer.global_step
        for writer in writers:
            writer.add_figure(f"{self.split}/confusion_matrix", figure, global_step=step, close=False)
            for k, name in enumerate(names if len(names) > 2 else names[1:]):
                cls = k if len(names) > 2 else 1
                writer.add_pr_curve(
                    f"{self.split}/pr_curve_{name}", (labels == cls).int(), probs[:, cls], global_step=step
                )
            writer.add_text(f"{self.split}/misclassified", "\n".join(rows), global_step=step)
            writer.flush()
        plt.close(figure)


def _split_texts(trainer, split: str) -> list[str] | None:
    dataset = getattr(getattr(trainer, "datamodule", None), f"{split}_dataset", None)
    return getattr(dataset, "texts", None)


def confusion_figure(confusion: torch.Tensor, names: list[str]):
    """A labelled confusion-matrix heat map (rows: true class, columns: predicted)."""
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2, 1.2 * len(names) + 1.5))
    ax.imshow(confusion.numpy(), cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("Predicted")
    ax.set_ylabel("True")
    top = int(confusion.max()) if confusion.numel() else 0
    for i in range(len(names)):
        for j in range(len(names)):
            value = int(confusion[i, j])
            ax.text(j, i, str(value), ha="center", va="center",
                    color="white" if value > top / 2 else "black")
    fig.tight_layout()
    return fig
