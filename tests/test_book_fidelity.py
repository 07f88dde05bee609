"""`python train.py` against the book's own loop, digit for digit (issue 13).

The reference is chapter 6 as ``gpt_class_finetune.py`` runs it, by the book's own code (the
``llms_from_scratch`` package): ``torch.manual_seed(123)`` before the loaders, again before the
book's (random) ``GPTModel``, again before the head, again before the optimizer;
``train_classifier_simple``; then the chapter's final ``calc_accuracy_loader`` on each full loader.
The same tiny random GPT-2 (our init equals the book's for the same seed), the same SMS split.
`python train.py` runs as a user types it, with the default (chapter) config.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _book import add_classification_head, create_dataloaders
from llms_from_scratch.ch04 import GPTModel
from llms_from_scratch.ch06 import SpamDataset, calc_accuracy_loader, train_classifier_simple

from spam_lightning.data.tokens import get_tokenizer
from spam_lightning.model.gpt import MODEL_CONFIGS

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 2
COMMAND = ["train.py", "model=gpt2-tiny", "model.weights=random", f"trainer.max_epochs={EPOCHS}"]
CHAPTER_LINES = ("Ep ", "Training accuracy", "Validation accuracy", "Test accuracy")


def _book_run(data_dir: Path) -> tuple[list[str], dict[str, list[float]]]:
    """The book's script on ``data_dir``'s CSVs: its printed lines and its history lists."""
    tokenizer = get_tokenizer()
    train_ds = SpamDataset(data_dir / "train.csv", tokenizer, max_length=None)
    val_ds = SpamDataset(data_dir / "validation.csv", tokenizer, train_ds.max_length)
    test_ds = SpamDataset(data_dir / "test.csv", tokenizer, train_ds.max_length)
    torch.manual_seed(123)
    train_loader, val_loader, test_loader = create_dataloaders(train_ds, val_ds, test_ds)
    torch.manual_seed(123)
    model = GPTModel(MODEL_CONFIGS["gpt2-tiny"])  # the book's script, its weight loading dropped
    add_classification_head(model, num_classes=2, seed=123)
    torch.manual_seed(123)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.1)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        history = train_classifier_simple(
            model, train_loader, val_loader, optimizer, "cpu", num_epochs=EPOCHS, eval_freq=50,
            eval_iter=5,
        )
        for title, loader in (("Training", train_loader), ("Validation", val_loader),
                              ("Test", test_loader)):
            accuracy = calc_accuracy_loader(loader, model, "cpu")
            print(f"{title} accuracy: {accuracy * 100:.2f}%")
    keys = ("train_losses", "val_losses", "train_accs", "val_accs")
    return out.getvalue().splitlines(), dict(zip(keys, history[:4], strict=True))


@pytest.mark.slow
def test_train_py_prints_the_books_lines(tmp_path: Path) -> None:
    env = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "HOME": str(tmp_path / "home")}
    proc = subprocess.run([sys.executable, str(REPO / COMMAND[0]), *COMMAND[1:]], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours = [line for line in proc.stdout.splitlines() if line.startswith(CHAPTER_LINES)]

    (run,) = (p.parent for p in (tmp_path / "outputs").rglob("metrics.json"))
    book, book_history = _book_run(tmp_path / "data" / "sms_spam")
    assert len(book) == 3 + 1 + 3 + 1 + 3  # steps 0, 50, 100, accuracies; 150, 200, 250; final
    assert ours == book, "\n".join(f"{a!r:75} {b!r}" for a, b in zip(ours, book, strict=False))

    history = json.loads((run / "history.json").read_text())
    for key, values in book_history.items():
        assert history[key] == pytest.approx(values, abs=1e-6), key
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["train_count"] == 1040  # the shuffled training loader, drop_last: as the book
    assert metrics["test_count"] == 300
