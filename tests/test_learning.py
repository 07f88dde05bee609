"""The tiny model really learns (issue 4): 100% train accuracy on an easy synthetic spam/ham set."""

from __future__ import annotations

import random

from _compose import compose_train

from spam_lightning.train import train


def write_easy_tsv(path, n_per_class: int = 60) -> None:
    rng = random.Random(0)
    ham_words = ["see", "you", "at", "lunch", "tomorrow", "mum", "home", "later", "ok", "thanks"]
    spam_words = ["WIN", "CASH", "PRIZE", "CLAIM", "FREE", "URGENT", "CALL", "NOW", "AWARD", "TXT"]
    lines = []
    for label, words in (("ham", ham_words), ("spam", spam_words)):
        for _ in range(n_per_class):
            lines.append(f"{label}\t{' '.join(rng.choices(words, k=rng.randint(3, 9)))}")
    rng.shuffle(lines)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_tiny_model_learns(tmp_path, capsys):
    source = tmp_path / "easy.tsv"
    write_easy_tsv(source)
    cfg = compose_train(
        [
            "model=gpt2-tiny", f"data.source={source}", "trainable=all", "token=flexible",
            "optimizer.lr=2e-3", "optimizer.weight_decay=0.0", "trainer.max_epochs=4",
            "trainer.enable_progress_bar=false", "logger=none", "eval_freq=1000",
        ],
        tmp_path,
    )
    metrics = train(cfg)
    assert metrics["train_count"] == 80  # 120 balanced rows, 70 % = 84; the chapter's drop_last
    assert metrics["train_accuracy"] == 1.0
    assert metrics["test_accuracy"] >= 0.95
    assert metrics["train_loss"] < 0.1
