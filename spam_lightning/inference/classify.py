"""Classify messages with a trained run (chapter 6.8): a Python API and the ``spam-classify`` CLI.

Preprocessing is the training run's: the GPT-2 tokenizer, truncation to the training
``max_length`` (and the context length), the same padding and token position. Where the pooled
token cannot see padding (a causal model pooling ``first``, ``flexible`` or ``masked_mean``),
messages are grouped by length and padded per batch, which gives identical outputs at a fraction
of the cost; the book's ``mean`` averages the padding too, so it is padded as in training.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# torch and the model load on first use, not at import: `spam-classify --help` answers at once
CHUNK = 1024  # messages read ahead and sorted by length; bounds memory for any input size


@dataclass
class Prediction:
    label: str
    probability: float
    probabilities: dict[str, float]
    text: str


class Classifier:
    """A trained classifier with its preprocessing, loaded from a run folder's bundle."""

    def __init__(
        self, run_dir: str | Path, device: str = "cpu", precision: str = "32", batch_size: int = 64
    ) -> None:
        import torch

        from spam_lightning.inference.bundle import load_bundle
        from spam_lightning.model.classifier import READS_REAL_TOKENS_ONLY, GPTClassifier

        if precision not in ("32", "bf16"):
            raise ValueError(f"precision={precision!r}; allowed: 32, bf16")
        gpt, config = load_bundle(run_dir, map_location="cpu")
        self.config = config
        self.class_names: list[str] = config["class_names"]
        self.max_length = min(int(config["max_length"]), int(config["model"]["context_length"]))
        self.token = config["token"]
        if self.token == "mean" and not config.get("mean_includes_padding", False):
            self.token = "masked_mean"  # a bundle from before the rename: its mean was masked
        self.padding = config["padding"]
        self.pad_token_id = int(config["pad_token_id"])
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        # unpadded training (padding=none) pools each message's own last token / own tokens
        unpadded = {"last": "flexible", "mean": "masked_mean"}
        pooled = unpadded.get(self.token, self.token) if self.padding == "none" else self.token
        self.model = GPTClassifier(gpt, token=pooled).to(device=self.device, dtype=self.dtype).eval()
        # per-batch padding is exact when the pooled position never sees padding
        self.dynamic = self.model.causal_mask and pooled in READS_REAL_TOKENS_ONLY
        if self.padding == "none" and not self.dynamic:
            self.batch_size = 1  # no padding at all: one message per forward pass

    def _encode(self, texts: list[str], offset: int = 0) -> list[list[int]]:
        from spam_lightning.data.tokens import encode_texts

        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"message {offset + i + 1} is {type(text).__name__}, not text")
            if not text.strip():
                raise ValueError(
                    f"message {offset + i + 1} is empty or only whitespace; nothing to classify"
                )
        return encode_texts(texts, max_length=self.max_length, context_length=self.max_length)

    def _probs(self, token_ids: list[list[int]]) -> torch.Tensor:
        import torch

        from spam_lightning.data.tokens import collate

        longest = not self.dynamic and self.padding == "longest"
        batch = collate(
            token_ids,
            padding="longest" if longest else "batch",
            max_length=self.max_length if longest else None,
            pad_token_id=self.pad_token_id,
        )
        with torch.inference_mode():
            logits = self.model(batch["input_ids"].to(self.device), batch["lengths"].to(self.device))
        return torch.softmax(logits.float(), dim=-1).cpu()

    def predict_proba(self, texts: Iterable[str]) -> torch.Tensor:
        """Class probabilities ``[N, num_classes]``, in input order."""
        import torch

        rows = [p for _, p in self._iter_probs(texts)]
        return torch.stack(rows) if rows else torch.empty(0, len(self.class_names))

    def _iter_probs(self, texts: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """Stream ``(text, probs)`` in input order, holding at most ``CHUNK`` messages."""
        it = iter(texts)
        offset = 0
        while chunk := list(itertools.islice(it, CHUNK)):
            ids = self._encode(chunk, offset)
            order = list(range(len(ids)))
            if self.dynamic:
                order.sort(key=lambda i: len(ids[i]))
            probs: list[torch.Tensor | None] = [None] * len(ids)
            for start in range(0, len(order), self.batch_size):
                sel = order[start : start + self.batch_size]
                for i, p in zip(sel, self._probs([ids[i] for i in sel]), strict=True):
                    probs[i] = p
            yield from zip(chunk, probs, strict=True)
            offset += len(chunk)

    def iter_predict(self, texts: Iterable[str]) -> Iterator[Prediction]:
        """Predictions one by one, streaming: works for inputs of any length."""
        for text, p in self._iter_probs(texts):
            k = int(p.argmax())
            yield Prediction(
                label=self.class_names[k],
                probability=float(p[k]),
                probabilities={n: float(v) for n, v in zip(self.class_names, p, strict=True)},
                text=text,
            )

    def predict(self, texts: str | Iterable[str]) -> list[Prediction]:
        """Predictions for one text or many."""
        return list(self.iter_predict([texts] if isinstance(texts, str) else texts))


def classify_review(text: str, run_dir: str | Path) -> str:
    """The chapter's ``classify_review``: the label of one message."""
    return Classifier(run_dir).predict(text)[0].label


# ------------------------------------------------------------------ CLI
def _read_texts(path: Path, text_column: str) -> Iterator[str]:
    """Messages from a CSV (``text_column``) or from a text file, one per line (blank lines skipped)."""
    if not path.exists():
        raise FileNotFoundError(f"--file {path}: no such file")
    if path.is_dir():  # pipes are fine: --file /dev/stdin, --file <(zcat messages.gz)
        raise ValueError(f"--file {path} is a folder; pass a text file or a CSV")
    try:
        if path.suffix.lower() == ".csv":
            # long messages are truncated later, as in training; csv's 128 KiB cap would refuse them
            csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))
            # utf-8-sig: a spreadsheet's byte-order mark must not rename the first column
            with path.open(newline="", encoding="utf-8-sig") as fh:
                reader = csv.DictReader(fh)
                try:
                    if not reader.fieldnames or text_column not in reader.fieldnames:
                        raise ValueError(
                            f"{path}: no column {text_column!r} (columns: {reader.fieldnames}); "
                            "use --text-column NAME"
                        )
                    for row in reader:
                        yield row[text_column] or ""
                except csv.Error as err:
                    raise ValueError(f"{path}, line {reader.line_num}: bad CSV ({err})") from err
        else:
            with path.open(encoding="utf-8-sig") as fh:
                for line in fh:
                    line = line.rstrip("\r\n")
                    if line.strip():
                        yield line
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from err


# characters that would split one prediction over several output lines or TSV columns
_ONE_LINE = str.maketrans(dict.fromkeys("\t\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029", " "))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="spam-classify",
        description="Classify messages with a trained spam-lightning run.",
    )
    p.add_argument("run_dir", help="a training run folder (outputs/runs/...) or its bundle/ folder")
    p.add_argument("texts", nargs="*", help="messages to classify")
    p.add_argument("--file", type=Path, help="a text file (one message per line) or a CSV")
    p.add_argument("--text-column", default="Text", help="CSV column with the messages (Text)")
    p.add_argument("--json", action="store_true", help="print JSON Lines, one object per message")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--precision", default="32", choices=["32", "bf16"])
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from spam_lightning.inference.bundle import BundleError  # after --help: it imports torch

    if not args.texts and args.file is None:
        print("spam-classify: give messages as arguments or --file PATH", file=sys.stderr)
        return 2
    if args.batch_size < 1:
        print("spam-classify: --batch-size must be >= 1", file=sys.stderr)
        return 2
    try:
        clf = Classifier(
            args.run_dir, device=args.device, precision=args.precision, batch_size=args.batch_size
        )
        texts: Iterable[str] = args.texts
        if args.file is not None:
            texts = itertools.chain(args.texts, _read_texts(args.file, args.text_column))
        for pred in clf.iter_predict(texts):
            if args.json:
                print(json.dumps(asdict(pred), ensure_ascii=False))
            else:
                text = pred.text.translate(_ONE_LINE)
                snippet = text if len(text) <= 60 else text[:57] + "..."
                print(f"{pred.label}\t{pred.probability:.4f}\t{snippet}")
    except (BundleError, ValueError, TypeError, FileNotFoundError) as err:
        print(f"spam-classify: error: {err}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `spam-classify ... | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
