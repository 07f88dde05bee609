"""``predictions.csv``: every validation and test message's label, prediction and class
probabilities, so two runs can be compared message by message (``scripts/compare.py``)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pandas as pd

from spam_lightning.io_utils import atomic_write

FILE = "predictions.csv"
SPLITS = ("val", "test")


class Predictions(L.Callback):
    """Written after the final evaluation (rank 0) from the module's ``test_results``: one row
    per message with ``split``, ``row`` (its position in the split, as ``data/`` prepared it),
    ``label``, ``predicted``, ``p_<class>`` per class and the message's ``text``."""

    def __init__(self, output_dir: str | Path) -> None:
        self.path = Path(output_dir) / FILE

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        results = getattr(pl_module, "test_results", None)
        if results is None or not trainer.is_global_zero:
            return
        names, data = results.class_names, trainer.datamodule
        frames = []
        for split in SPLITS:
            if (out := results.outputs.get(split)) is None:
                continue
            probs = out["probs"].float().numpy()
            frame = pd.DataFrame({"split": split, "row": out["index"].numpy(),
                                  "label": [names[i] for i in out["labels"].tolist()],
                                  "predicted": [names[i] for i in probs.argmax(1).tolist()]})
            frame = frame.join(pd.DataFrame(probs, columns=[f"p_{n}" for n in names]))
            texts = getattr(data.token_dataset(split), "texts", None) if hasattr(data, "token_dataset") else None
            if texts is not None:
                frame["text"] = [texts[i] for i in frame["row"]]
            frames.append(frame)
        if frames:
            table = pd.concat(frames, ignore_index=True)
            atomic_write(self.path, lambda tmp: table.to_csv(tmp, index=False, float_format="%.6g"))
