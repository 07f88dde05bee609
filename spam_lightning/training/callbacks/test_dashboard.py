"""The final evaluation in TensorBoard: confusion matrix, precision-recall curves, mistakes."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from torchmetrics.functional.classification import multiclass_confusion_matrix
from torchmetrics.utilities.plot import plot_confusion_matrix

from spam_lightning.training.plots import plt


class TestDashboard(L.Callback):
    """After the final evaluation, from the module's ``test_results`` and the test loader's texts:
    confusion matrix, precision-recall curves and the misclassified messages in TensorBoard."""

    def __init__(self, split: str = "test", max_examples: int = 50) -> None:
        self.split, self.max_examples = split, max_examples

    @rank_zero_only
    def on_test_end(self, trainer, pl_module) -> None:
        results = getattr(pl_module, "test_results", None)
        out = results.outputs.get(self.split) if results is not None else None
        writers = [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if out is None or not writers or len(out["labels"]) == 0:
            return
        names = results.class_names
        probs, labels = out["probs"].float(), out["labels"]
        preds = probs.argmax(-1)
        confusion = multiclass_confusion_matrix(preds, labels, num_classes=len(names))
        figure, _ = plot_confusion_matrix(confusion, labels=names, cmap="Blues")  # rows: the true class
        loaders = trainer.test_dataloaders  # the split's loader: its messages, if it keeps them
        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
        k = list(results.outputs).index(self.split)
        dataset = getattr(loaders[k], "dataset", None) if k < len(loaders) else None
        texts = getattr(dataset, "texts", None)
        wrong = (preds != labels).nonzero().flatten().tolist()[: self.max_examples]
        rows = ["| # | true | predicted | p(predicted) | message |", "|---|---|---|---|---|"]
        for i in wrong:
            idx = int(out["index"][i])
            text = texts[idx] if texts is not None and idx < len(texts) else f"example {idx}"
            text = text.replace("|", "\\|").replace("\n", " ")
            rows.append(f"| {idx} | {names[int(labels[i])]} | {names[int(preds[i])]} | "
                        f"{float(probs[i, preds[i]]):.3f} | {text} |")
        if not wrong:
            rows.append("| | | | | no misclassified messages |")
        step = trainer.global_step
        for writer in writers:
            writer.add_figure(f"{self.split}/confusion_matrix", figure, global_step=step, close=False)
            for k, name in enumerate(names if len(names) > 2 else names[1:]):
                cls = k if len(names) > 2 else 1
                writer.add_pr_curve(f"{self.split}/pr_curve_{name}", (labels == cls).int(), probs[:, cls],
                                    global_step=step)
            writer.add_text(f"{self.split}/misclassified", "\n".join(rows), global_step=step)
            writer.flush()
        plt.close(figure)
