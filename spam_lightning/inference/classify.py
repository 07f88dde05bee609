"""Classify messages with a trained run (chapter 6.8): a Python API and the ``spam-classify`` CLI.
Preprocessing is the training run's, as the bundle's model family loads it (``Predictor``); where
the model never reads padding, messages are grouped by length and padded per batch (same output)."""

from __future__ import annotations

import argparse
import contextlib
import csv
import itertools
import json
import os
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

if TYPE_CHECKING:
    import torch

# torch and the model load on first use, not at import: `spam-classify --help` answers at once
CHUNK = 1024  # messages read ahead and sorted by length; bounds memory for any input size
CHUNK_CHARS = 1 << 20  # ... and at most this many characters of them (one longer message alone)
MAX_MESSAGE_BYTES = 4 << 20  # the longest line, or CSV record, --file reads (4 MiB)


_END = object()


@dataclass
class Prediction:
    label: str
    probability: float
    probabilities: dict[str, float]
    text: str


class Classifier:
    """A run's classifier with its preprocessing, as the bundle's model family loads it."""

    def __init__(self, run_dir: str | Path, device: str = "cpu", precision: str = "32", batch_size: int = 64,
                 threshold: float | None = None, raw: bool = False) -> None:
        """``threshold``: a decision threshold on P(class 1) of two classes instead of the bundle's
        (0.5: the argmax); ``raw``: the model's own probabilities, without the bundle's temperature
        (the bundle's threshold, mapped to them, still decides: the same labels)."""
        import torch

        from spam_lightning.inference.bundle import CONFIG, open_bundle, operating_point

        if precision not in ("32", "bf16"):
            raise ValueError(f"precision={precision!r}; allowed: 32, bf16")
        if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, int | float)
                                      or not 0 <= threshold <= 1):
            raise ValueError(f"threshold={threshold!r}; it must be a probability in [0, 1] (0.5: the argmax)")
        self.device = resolve_device(device)  # before the bundle loads: a typo costs nothing
        family, folder, config = open_bundle(run_dir)
        self.operating_point = op = operating_point(config, folder / CONFIG)
        if threshold is not None and config["num_classes"] != 2:
            raise ValueError(f"threshold={threshold}: a threshold needs two classes (class 1 is the positive "
                             f"one); this model has {config['num_classes']}")
        # the probabilities reported: calibrated (the bundle's temperature) unless raw
        self.temperature = 1.0 if raw else op.temperature
        if threshold is not None:
            self.threshold: float | None = float(threshold)
        else:  # the bundle's, on the probabilities reported (raw: mapped back through T)
            self.threshold = op.threshold if not raw else raw_threshold(op.threshold, op.temperature)
        self.kind = family.kind
        self.dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        self.predictor = p = family.load(folder, config, self.device, self.dtype)
        self.config, self.class_names = config, config["class_names"]
        self.batch_size = min(batch_size, p.batch_size or batch_size)
        self.model, self.max_length, self.token, self.padding = p.model, p.max_length, p.token, p.padding

    def predict_proba(self, texts: Iterable[str]) -> torch.Tensor:
        """Class probabilities ``[N, num_classes]``, in input order (with the bundle's temperature
        unless ``raw``)."""
        import torch

        rows = [p for _, p in self._iter_probs(texts)]
        return torch.stack(rows) if rows else torch.empty(0, len(self.class_names))

    def _iter_probs(self, texts: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """Stream ``(text, probs)`` in input order, holding at most ``CHUNK`` messages. A bad message
        or input (a malformed file) stops the stream with its error, after every message before it."""
        from spam_lightning.calibration import apply  # the bundle's temperature (1: unchanged)

        offset, it = 0, iter(texts)
        while True:
            chunk: list[str] = []
            error: Exception | None = None
            try:
                size = 0
                while len(chunk) < CHUNK and size < CHUNK_CHARS:
                    if (text := next(it, _END)) is _END:
                        break
                    chunk.append(text)
                    size += len(text) if isinstance(text, str) else 1
            except Exception as err:  # a malformed file: classify what came before, then report it
                error = err
            if not chunk and error is None:
                return
            bad = next((i for i, t in enumerate(chunk) if not isinstance(t, str) or not t.strip()), None)
            if bad is not None:
                n, text, chunk = offset + bad + 1, chunk[bad], chunk[:bad]
                error = ValueError(f"message {n} is empty or only whitespace; nothing to classify")
                if not isinstance(text, str):
                    error = TypeError(f"message {n} is {type(text).__name__}, not text")
            ids = self.predictor.encode(chunk)
            order = sorted(range(len(ids)), key=lambda i: len(ids[i]) if self.predictor.dynamic else 0)
            probs: list[torch.Tensor | None] = [None] * len(ids)
            for start in range(0, len(order), self.batch_size):
                sel = order[start : start + self.batch_size]
                batch = apply(self.predictor.probs([ids[i] for i in sel]), self.temperature)
                for i, p in zip(sel, batch, strict=True):
                    probs[i] = p
            yield from zip(chunk, probs, strict=True)
            if error is not None:
                raise error
            offset += len(chunk)

    def iter_predict(self, texts: Iterable[str]) -> Iterator[Prediction]:
        """Predictions one by one, streaming: works for inputs of any length."""
        from spam_lightning.calibration import decide

        for text, p in self._iter_probs(texts):
            k = int(decide(p[None], self.threshold)[0])  # the argmax, or P(class 1) >= threshold
            probabilities = {n: float(v) for n, v in zip(self.class_names, p, strict=True)}
            yield Prediction(self.class_names[k], float(p[k]), probabilities, text)

    def predict(self, texts: str | Iterable[str]) -> list[Prediction]:
        """Predictions for one text or many."""
        return list(self.iter_predict([texts] if isinstance(texts, str) else texts))


def raw_threshold(threshold: float | None, temperature: float) -> float | None:
    """A threshold on calibrated P(class 1) as the same decision on the raw probabilities: with two
    classes, calibrated ``logit = raw logit / T``, so ``raw = sigmoid(T * logit(threshold))``."""
    import math

    if threshold is None or temperature == 1.0 or threshold in (0.0, 1.0):
        return threshold
    z = temperature * math.log(threshold / (1 - threshold))
    return 1 / (1 + math.exp(-z)) if z > -700 else 0.0


def resolve_device(name: str | torch.device) -> torch.device:
    """``torch.device(name)`` if this machine can hold a tensor there, else a one-line ``ValueError``."""
    import torch

    hint = "use cpu, cuda, cuda:N or mps"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device {str(name)[:40]!r} is not a device name; {hint}") from None
    if device.type == "meta":
        raise ValueError(f"device {name!r} holds no data; {hint}")
    try:
        torch.empty(1, device=device)
    except Exception as err:  # no CUDA/MPS, an index past the last GPU, a backend not built in
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"device {name!r} is not available ({first[:120]}); {hint}") from None
    return device


def classify_review(text: str, run_dir: str | Path) -> str:
    """The chapter's ``classify_review``: the label of one message."""
    return Classifier(run_dir).predict(text)[0].label


# ------------------------------------------------------------------ CLI
STDIN = "-"
_LONE_CR = re.compile(rb"(?<=\r)(?!\n)")  # old Mac line ends, kept as line breaks as before


def _lines(fh: BinaryIO, name: str) -> Iterator[str]:
    """Decoded lines with their line ends (as ``open(newline="")`` gives), decoded one by one so a
    bad byte is reported with its line number and its offset in the file; a line longer than
    ``MAX_MESSAGE_BYTES`` is an error, found before more of it is read."""
    offset, number = 0, 0
    while raw := fh.readline(MAX_MESSAGE_BYTES + 2):  # + a line end
        if len(raw.rstrip(b"\r\n")) > MAX_MESSAGE_BYTES:
            raise ValueError(f"{name}, line {number + 1}: longer than {MAX_MESSAGE_BYTES:,} bytes, "
                             "the most spam-classify reads as one message; split the line or "
                             "shorten it (a model reads only its first max_length tokens)")
        for piece in _LONE_CR.split(raw) if b"\r" in raw else (raw,):
            number += 1
            try:
                line = piece.decode("utf-8")
            except UnicodeDecodeError as err:
                at = offset + err.start
                raise ValueError(
                    f"{name}, line {number}: not UTF-8 text ({err.reason}: byte 0x{piece[err.start]:02x} "
                    f"at offset {at:,} of the file, column {err.start + 1} of the line); save it as UTF-8"
                ) from None
            if number == 1 and line.startswith("\ufeff"):
                line = line[1:]  # a spreadsheet's byte-order mark must not rename the first column
            offset += len(piece)
            yield line


def _csv_messages(lines: Iterator[str], name: str, text_column: str) -> Iterator[str]:
    """The ``text_column`` of each CSV record; a malformed record is an error naming its lines."""
    size = 0  # characters of the record being read: a quoted field may run over many lines

    def bounded(lines: Iterator[str]) -> Iterator[str]:
        nonlocal size
        for line in lines:
            if (size := size + len(line)) > MAX_MESSAGE_BYTES:
                raise ValueError(f"{where()}: a record longer than {MAX_MESSAGE_BYTES:,} "
                                 "characters, the most spam-classify reads as one message; look "
                                 f'for a stray quote (") on line {before + 1}, or shorten it')
            yield line

    reader = csv.reader(bounded(lines), strict=True)
    before = 0

    def where() -> str:
        first, last = before + 1, max(reader.line_num, before + 1)
        return f"{name}, line {first}" if first == last else f"{name}, lines {first}-{last}"

    try:
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{name}: the file is empty; expected a header row with a {text_column!r} column")
        if text_column not in header:
            raise ValueError(f"{name}: no column {text_column!r} (columns: {header}); use --text-column NAME")
        column = header.index(text_column)
        before, size = reader.line_num, 0
        for row in reader:
            if row:  # blank lines are not records
                if len(row) != len(header):
                    raise ValueError(
                        f"{where()}: {len(row)} field(s), the header has {len(header)}; a stray or "
                        'unclosed quote (") joins lines. Quote fields that hold commas, quotes or '
                        'line breaks, doubling each quote inside ("say ""hi""")'
                    )
                yield row[column]
            before, size = reader.line_num, 0
    except csv.Error as err:
        if "end of data" in str(err):
            raise ValueError(
                f"{name}, line {before + 1}: a quoted field that starts in this record is never closed "
                f'(the file ends inside it); look for a stray quote (") on line {before + 1}'
            ) from None
        raise ValueError(f'{where()}: bad CSV ({err}); look for a stray quote (") in the record on '
                         f"line {before + 1}") from None


def _read_texts(path: str | Path, text_column: str, fmt: str = "auto") -> Iterator[str]:
    """Messages from a CSV (``text_column``) or a text file, one per line (blank lines skipped);
    ``-`` is standard input (text unless ``fmt="csv"``)."""
    stdin, path = str(path) == STDIN, Path(path)
    name = "<stdin>" if stdin else str(path)
    if fmt == "auto":
        fmt = "csv" if not stdin and path.suffix.lower() == ".csv" else "text"
    if not stdin and not path.exists():
        raise FileNotFoundError(f"--file {path}: no such file")
    if not stdin and path.is_dir():  # pipes are fine: --file /dev/stdin, --file <(zcat messages.gz)
        raise ValueError(f"--file {path} is a folder; pass a text file or a CSV")
    try:
        with contextlib.nullcontext(sys.stdin.buffer) if stdin else path.open("rb") as fh:
            lines = _lines(fh, name)
            if fmt == "csv":
                # long messages are truncated later, as in training; csv's 128 KiB cap would refuse them
                csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))
                yield from _csv_messages(lines, name, text_column)
            else:
                yield from (line.rstrip("\r\n") for line in lines if line.strip())
    except OSError as err:
        raise ValueError(f"--file {name}: cannot read it ({err.strerror or err})") from None


# characters that would split one prediction over several output lines or TSV columns: a space
_ONE_LINE = dict.fromkeys(map(ord, "\t\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"), " ")
# every other control character (C0, DEL, C1: ESC, CSI, NUL, BEL, ...) and the bidirectional
# overrides and isolates that reorder what a terminal shows: written as a visible escape
_CONTROLS = [*range(0x20), *range(0x7F, 0xA0), *range(0x202A, 0x202F), *range(0x2066, 0x206A)]
_SHOWN = {c: f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}" for c in _CONTROLS}
_TERMINAL_SAFE = str.maketrans(_SHOWN | _ONE_LINE)


def terminal_text(text: str) -> str:
    """``text`` on one line with nothing a terminal would act on: line and column breaks become
    spaces, other control characters a visible ``\\x1b``-style escape (``--json`` is JSON's)."""
    return text.translate(_TERMINAL_SAFE)


# JSON escapes C0 itself; DEL, C1 (U+009B is CSI to some terminals), the bidi controls and the
# line separators still pass raw with ensure_ascii=False: escaped too, the same JSON value
_JSON_SAFE = str.maketrans({c: f"\\u{c:04x}" for c in [*_SHOWN, 0x2028, 0x2029] if c >= 0x7F})


def json_line(pred: Prediction) -> str:
    """One prediction as a JSON Lines record that is safe to print to a terminal."""
    return json.dumps(asdict(pred), ensure_ascii=False).translate(_JSON_SAFE)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spam-classify", description="Classify messages with a trained "
                                "spam-lightning run. Options and messages may come in any order; put -- "
                                "before messages that start with a dash.")
    p.add_argument("run_dir", help="a training run folder (outputs/runs/...) or its bundle/ folder")
    p.add_argument("texts", nargs="*", help="messages to classify")
    p.add_argument("--file", help="a text file (one message per line), a CSV (*.csv), or - for standard input")
    p.add_argument("--format", choices=["auto", "text", "csv"], default="auto",
                   help="how to read --file (auto: csv for *.csv, else text, stdin included)")
    p.add_argument("--text-column", default="Text", help="CSV column with the messages (Text)")
    p.add_argument("--json", action="store_true", help="print JSON Lines, one object per message")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--precision", default="32", choices=["32", "bf16"])
    add_operating_point_options(p)
    return p


def add_operating_point_options(p: argparse.ArgumentParser) -> None:
    """``--threshold`` and ``--raw``: spam-classify's and spam-serve's way past the bundle's
    operating point."""
    p.add_argument("--threshold", type=float, metavar="P",
                   help="label class 1 (spam) when its probability is >= P, instead of the run's "
                   "operating point (0.5: the argmax, as the book); two classes only")
    p.add_argument("--raw", action="store_true",
                   help="the model's own probabilities, without the run's temperature scaling "
                   "(the run's threshold still decides, on them: the same labels)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)  # `RUN --json "hello"` as well as `RUN "hello" --json`
    from spam_lightning.inference.bundle import BundleError  # after --help: it imports torch

    if not args.texts and args.file is None:
        print("spam-classify: give messages as arguments or --file PATH", file=sys.stderr)
        return 2
    if args.batch_size < 1:
        print("spam-classify: --batch-size must be >= 1", file=sys.stderr)
        return 2
    try:
        clf = Classifier(args.run_dir, args.device, args.precision, args.batch_size, args.threshold, args.raw)
        texts: Iterable[str] = args.texts
        if args.file is not None:
            texts = itertools.chain(args.texts, _read_texts(args.file, args.text_column, args.format))
        for pred in clf.iter_predict(texts):
            if args.json:
                print(json_line(pred))
            else:
                text = terminal_text(pred.text)
                snippet = text if len(text) <= 60 else text[:57] + "..."
                print(f"{pred.label}\t{pred.probability:.4f}\t{snippet}")
    except BrokenPipeError:  # `spam-classify ... | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (BundleError, ValueError, TypeError, OSError) as err:
        with contextlib.suppress(OSError):
            sys.stdout.flush()  # the predictions before the problem come out first
        message = " ".join(str(err).split("\n"))
        print(f"spam-classify: error: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
