"""``CSVDataModule``: any text-classification CSV (two or more classes) through the same pipeline.

Either three split files (``data.train``, ``data.validation``, ``data.test``) or one file
(``data.source``) that is shuffled with a fixed seed and split 70/10/20 like the chapter, optionally
balanced first. Class names come from the data (the sorted training labels) unless
``data.class_names`` fixes them; the model's head follows ``num_classes``.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import logging
import os
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from filelock import FileLock

from spam_lightning.data.datamodule import (
    SPLITS,
    SplitData,
    TextClassificationDataModule,
    _int_at_least,
    check_split_fractions,
)
from spam_lightning.data.source import (
    DataError,
    atomic_write_bytes,
    clean_stale_temps,
    sha256_bytes,
)
from spam_lightning.data.table import (
    LOCK_NAME,
    MAX_LISTED,
    META_NAME,
    SPLIT_FILES,
    Record,
    check_splits_not_empty,
    files_match,
    random_split,
    read_meta,
    split_records,
)
from spam_lightning.data.tokens import PAD_TOKEN_ID

logger = logging.getLogger(__name__)

CSV_FORMAT_VERSION = 1
_SEP_ALIASES = {"tab": "\t", "\\t": "\t", "comma": ",", "semicolon": ";"}
_INT_RE = re.compile(r"[+-]?\d+")


@dataclass(frozen=True)
class TextTable:
    """One CSV read as strings: every column (``frame``), and its texts and stripped labels."""

    texts: list[str]
    labels: list[str]
    name: str
    frame: pd.DataFrame


def resolve_sep(sep: str | None, path: str | os.PathLike[str] | None) -> str:
    """``null`` -> tab for ``.tsv`` / ``.tab`` files, else comma; ``tab`` is an alias for ``\\t``."""
    if sep is None:
        suffix = Path(str(path or "")).suffix.lower()
        return "\t" if suffix in (".tsv", ".tab") else ","
    sep = _SEP_ALIASES.get(str(sep), str(sep))
    if len(sep) != 1 or sep in ('"', "\n", "\r"):
        raise ValueError(f"data.sep={sep!r}: need one character (or tab, comma, semicolon)")
    return sep


def row_lines(text: str, sep: str) -> tuple[list[Record], int | None]:
    """The data records (after the header) with their start lines, as pandas splits them.

    Only called to name the line of a problem: a second pass over the text costs about a
    second per 60 MB, which a valid file never pays.
    """
    records, unterminated = split_records(text, sep)
    return records[1:], unterminated


def _decode(data: bytes, name: str) -> str:
    if not data:
        raise DataError(f"{name}, line 1: the file is empty (0 bytes)")
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(
            f"{name}, line {line}: bytes that are not valid UTF-8 (first: 0x{data[e.start]:02x}); "
            f"save the file as UTF-8"
        ) from e


def _malformed(name: str, text: str, sep: str, detail: str) -> DataError:
    """The first rows whose field count differs from the header's, by line (pandas' wording aside)."""
    records, unterminated = split_records(text, sep)
    width = len(records[0].fields) if records else 0
    problems = [
        f"  {name}, line {r.line}: expected {width} fields like the header, found {len(r.fields)}"
        for r in records[1:]
        if len(r.fields) != width
    ]
    if unterminated is not None:
        problems.append(f'  {name}, line {unterminated}: a quote (") that is never closed')
    listed = "\n".join(problems[:MAX_LISTED]) or f"  {name}: {detail}"
    return DataError(
        f"{name}: malformed CSV:\n{listed}\n(quote texts that contain {sep!r}, quotes or line "
        f"breaks; set data.sep if the file is not {'tab' if sep == chr(9) else repr(sep)}-separated)"
    )


def read_text_table(
    data: bytes, name: str, text_column: str, label_column: str, sep: str = ","
) -> TextTable:
    """Read a CSV with a header and check it; every error names the file, the line and the problem.

    All cells are read as strings (no NA guessing: a text "NA" stays "NA"); labels are stripped.
    """
    text = _decode(data, name)
    try:
        with warnings.catch_warnings():
            # a row with an extra field must not silently shift every column (pandas' index guess)
            warnings.simplefilter("error", pd.errors.ParserWarning)
            frame = pd.read_csv(
                io.StringIO(text),
                sep=sep,
                dtype=str,
                keep_default_na=False,
                na_filter=False,
                index_col=False,
            )
    except pd.errors.EmptyDataError as e:
        raise DataError(f"{name}, line 1: no header line (the file is blank)") from e
    except (pd.errors.ParserError, pd.errors.ParserWarning) as e:
        raise _malformed(name, text, sep, str(e).strip()) from e
    columns = [str(c) for c in frame.columns]
    for option, column in (("data.text_column", text_column), ("data.label_column", label_column)):
        if column not in columns:
            raise DataError(
                f"{name}, line 1: missing column {column!r} ({option}); the header has: "
                f"{', '.join(map(repr, columns))[:200]}"
            )
    if frame.empty:
        raise DataError(f"{name}, line 2: no data rows (only a header)")
    texts = frame[text_column].astype(str)
    labels = frame[label_column].astype(str).str.strip()
    bad_text = texts.str.strip() == ""
    bad_label = labels == ""
    if bad_text.any() or bad_label.any():
        records, _ = row_lines(text, sep)
        aligned = len(records) == len(frame)
        problems = []
        for row in frame.index[bad_text | bad_label]:
            what = []
            short = aligned and len(records[row].fields) < len(columns)
            if short:  # pandas fills a short row's missing cells with ""
                found = len(records[row].fields)
                what.append(f"expected {len(columns)} fields like the header, found {found}")
            if bad_text[row] and not short:
                what.append("empty text" if texts[row] == "" else "text is only whitespace")
            if bad_label[row] and not short:
                what.append(f"empty label (column {label_column!r})")
            where = f"line {records[row].line}" if aligned else f"data row {row + 1}"
            problems.append(f"  {name}, {where}: {'; '.join(what)}")
        more = (
            f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        )
        raise DataError(
            f"{name}: {len(problems)} bad row(s):\n" + "\n".join(problems[:MAX_LISTED]) + more
        )
    return TextTable(texts.tolist(), labels.tolist(), name, frame)


def natural_sorted(labels: Sequence[str]) -> list[str]:
    """Unique labels, numerically when all are integers (2 before 10), else as strings."""
    unique = set(labels)
    if all(_INT_RE.fullmatch(v) for v in unique):
        return sorted(unique, key=int)
    return sorted(unique)


def map_labels(
    tables: dict[str, TextTable],
    class_names: Sequence[str] | None,
    line_of: Callable[[TextTable, int], int | str],
) -> tuple[list[str], dict[str, list[int]]]:
    """Class names (given, or the sorted training labels) and each split's class indices.

    With ``class_names`` given, labels match them by name, or are integer indices into them
    (``0`` -> the first name) when no label is a name. Without, validation / test labels must
    occur in training: the head could never predict a class it was not trained on.
    """
    train = tables["train"]
    every = [lab for t in tables.values() for lab in t.labels]
    if class_names:
        names = list(class_names)
        by_index = not set(every) & set(names) and all(
            _INT_RE.fullmatch(v) and 0 <= int(v) < len(names) for v in set(every)
        )
        keys = [str(i) for i in range(len(names))] if by_index else names
        lookup = {key: i for i, key in enumerate(keys)}
        for table in tables.values():
            for row, label in enumerate(table.labels):
                if label not in lookup:
                    raise DataError(
                        f"{table.name}, line {line_of(table, row)}: unknown label {label!r}; "
                        f"data.class_names={names} (labels must be one of these names, or "
                        f"integer indices 0..{len(names) - 1} into them)"
                    )
        missing = set(range(len(names))) - {lookup[lab] for lab in train.labels}
        if missing:
            logger.warning(
                "%s: no training examples of class(es) %s",
                train.name,
                ", ".join(names[i] for i in sorted(missing)),
            )
    else:
        names = natural_sorted(train.labels)
        lookup = {n: i for i, n in enumerate(names)}
        for split in ("validation", "test"):
            table = tables[split]
            for row, label in enumerate(table.labels):
                if label not in lookup:
                    raise DataError(
                        f"{table.name}, line {line_of(table, row)}: label {label!r} does not "
                        f"occur in the training split ({train.name}), so the model could never "
                        f"predict it; the training labels are: {', '.join(names)}. Fix the "
                        f"label, or list every class in data.class_names=[...]"
                    )
    if len(names) < 2:
        raise DataError(
            f"{train.name}: only one class ({names[0]!r}) in the training labels; a classifier "
            f"needs at least 2"
        )
    return names, {s: [lookup[lab] for lab in t.labels] for s, t in tables.items()}


def load_csv_splits(
    paths: dict[str, Path],
    text_column: str,
    label_column: str,
    sep: str,
    class_names: Sequence[str] | None,
) -> tuple[list[str], dict[str, SplitData]]:
    """Read the three split files; returns the class names and each split's texts and indices."""
    raw = {split: Path(paths[split]).read_bytes() for split in SPLITS}
    tables = {
        split: read_text_table(raw[split], str(paths[split]), text_column, label_column, sep)
        for split in SPLITS
    }
    lines_cache: dict[str, list[int]] = {}

    def line_of(table: TextTable, row: int) -> int | str:
        """A row's line, found only when an error names it."""
        split = next(s for s, t in tables.items() if t is table)
        if split not in lines_cache:
            records, _ = row_lines(_decode(raw[split], table.name), sep)
            lines_cache[split] = [r.line for r in records]
        lines = lines_cache[split]
        return lines[row] if len(lines) == len(table.labels) else f"? (data row {row + 1})"

    names, indices = map_labels(tables, class_names, line_of)
    return names, {
        split: SplitData(tables[split].texts, indices[split], tables[split].name)
        for split in SPLITS
    }


def balance_classes(frame: pd.DataFrame, labels: pd.Series, seed: int) -> pd.DataFrame:
    """Downsample every class to the rarest one's count (the chapter's balancing, for k classes)."""
    smallest = int(labels.value_counts().min())
    parts = [
        frame[labels == label].sample(smallest, random_state=seed)
        for label in natural_sorted(labels.tolist())
    ]
    return pd.concat(parts)


def frame_csv_bytes(frame: pd.DataFrame) -> bytes:
    """Every cell quoted: texts with quotes, separators or bare ``\\r`` read back unchanged."""
    return frame.to_csv(index=False, quoting=csv.QUOTE_ALL).encode("utf-8")


def _check_class_names(class_names: Sequence[str] | None) -> list[str] | None:
    if class_names is None:
        return None
    names = [str(n) for n in class_names]
    if len(names) < 2 or len(set(names)) != len(names) or any(not n.strip() for n in names):
        raise ValueError(
            f"data.class_names={names}: need at least 2 distinct, non-empty names (or null to "
            f"take them from the data)"
        )
    return names


class CSVDataModule(TextClassificationDataModule):
    """Any text-classification CSV: three split files, or one file split 70/10/20 (seeded)."""

    def __init__(
        self,
        train: str | None = None,
        validation: str | None = None,
        test: str | None = None,
        source: str | None = None,
        text_column: str = "text",
        label_column: str = "label",
        class_names: Sequence[str] | None = None,
        sep: str | None = None,
        balance: bool = False,
        data_dir: str = "data/csv",
        split_seed: int = 123,
        train_frac: float = 0.7,
        val_frac: float = 0.1,
        max_length: int | str | None = None,
        context_length: int = 1024,
        padding: str = "longest",
        bucketing: bool = False,
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 123,
        pad_token_id: int = PAD_TOKEN_ID,
    ) -> None:
        super().__init__(
            data_dir=data_dir,
            max_length=max_length,
            context_length=context_length,
            padding=padding,
            bucketing=bucketing,
            batch_size=batch_size,
            num_workers=num_workers,
            seed=seed,
            pad_token_id=pad_token_id,
        )
        train_frac, val_frac = check_split_fractions(train_frac, val_frac)
        files = {"train": train, "validation": validation, "test": test}
        given = {k: v for k, v in files.items() if v is not None}
        if source is not None and given:
            raise ValueError(
                f"data.source={source} and data.{'/'.join(given)} are both set: give one file to "
                f"split (data.source) or the three split files, not both"
            )
        if source is None and len(given) < 3:
            missing = ", ".join(f"data.{k}" for k in files if k not in given)
            raise ValueError(
                f"data=csv needs data.train, data.validation and data.test (missing: {missing}), "
                f"or data.source=ONE_FILE to split {train_frac:g}/{val_frac:g}/rest"
            )
        for option, path in {**given, **({"source": source} if source else {})}.items():
            if not Path(str(path)).expanduser().is_file():
                raise DataError(
                    f"data.{option}: {Path(str(path)).expanduser().resolve()}: no such file"
                )
        if not text_column or not label_column or text_column == label_column:
            raise ValueError(
                f"data.text_column={text_column!r}, data.label_column={label_column!r}: need two "
                f"different column names"
            )
        if balance and source is None:
            raise ValueError(
                "data.balance=true balances one file before it is split: it needs data.source"
            )
        _int_at_least("data.split_seed", split_seed, 0)
        self.fixed_class_names = _check_class_names(class_names)
        # class_names: the LightningModule records the resolved names under that key, and the
        # logger merges both hparams (a null here, "from the data", would conflict with them)
        self.save_hyperparameters(ignore=["class_names"])

        def resolve(p: str | None) -> Path | None:
            return None if p is None else Path(str(p)).expanduser().resolve()

        self.source = resolve(source)
        self.files = {k: resolve(v) for k, v in files.items()}
        self.text_column = str(text_column)
        self.label_column = str(label_column)
        self.sep = resolve_sep(sep, source if source is not None else train)
        self.balance = bool(balance)
        self.split_seed = int(split_seed)
        self.train_frac = float(train_frac)
        self.val_frac = float(val_frac)
        self.class_names = list(self.fixed_class_names or [])

    def _settings(self) -> dict[str, Any]:
        return {
            "format": CSV_FORMAT_VERSION,
            "kind": "csv",
            "text_column": self.text_column,
            "label_column": self.label_column,
            "sep": self.sep,
            "balance": self.balance,
            "split_seed": self.split_seed,
            "train_frac": self.train_frac,
            "val_frac": self.val_frac,
        }

    def prepare_data(self) -> None:
        """Split ``data.source`` into ``data_dir`` (locked, atomic, reused); three files: nothing."""
        if self.source is not None:
            prepare_csv_split(self.source, self.data_dir, self._settings())

    def load_splits(self) -> dict[str, SplitData]:
        if self.source is None:
            paths = {k: v for k, v in self.files.items() if v is not None}
            sep = self.sep
        else:
            paths = prepared_paths(self.data_dir, self._settings(), self.source)
            sep = ","
        names, splits = load_csv_splits(
            paths, self.text_column, self.label_column, sep, self.fixed_class_names
        )
        self.class_names = names
        return splits


def prepared_paths(data_dir: Path, settings: dict[str, Any], source: Path) -> dict[str, Path]:
    """The split files ``prepare_data`` wrote for these settings (a clear error if it has not)."""
    meta = read_meta(data_dir)
    if (
        meta is None
        or meta.get("settings") != settings
        or meta.get("source", {}).get("path") != str(source)
        or not files_match(data_dir, meta)
    ):
        raise DataError(
            f"{data_dir}: no split of {source} with these settings (or it changed since); call "
            f"prepare_data() first (the Trainer does)"
        )
    return {split: data_dir / fname for split, fname in SPLIT_FILES.items()}


def prepare_csv_split(source: Path, data_dir: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """Shuffle + split one CSV into ``train/validation/test.csv`` + ``meta.json`` (all columns kept).

    Locked so that concurrent processes (DDP ranks, joblib jobs) split once; reused while the
    source's sha256 and the settings match.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(data_dir / LOCK_NAME)):
        clean_stale_temps(data_dir)
        data = source.read_bytes()
        src_sha = sha256_bytes(data)
        meta = read_meta(data_dir)
        if (
            meta is not None
            and meta.get("settings") == settings
            and meta.get("source", {}).get("sha256") == src_sha
            and meta.get("source", {}).get("path") == str(source)
            and files_match(data_dir, meta)
        ):
            logger.info("reusing the split of %s in %s", source, data_dir)
            return meta
        (data_dir / META_NAME).unlink(missing_ok=True)  # no stale meta over half-new CSVs
        table = read_text_table(
            data, str(source), settings["text_column"], settings["label_column"], settings["sep"]
        )
        frame = table.frame
        labels = pd.Series(table.labels, index=frame.index)
        if settings["balance"]:
            frame = balance_classes(frame, labels, settings["split_seed"])
        splits = random_split(
            frame, settings["train_frac"], settings["val_frac"], settings["split_seed"]
        )
        check_splits_not_empty(
            str(source), len(frame), splits, settings["train_frac"], settings["val_frac"]
        )
        files: dict[str, str] = {}
        counts: dict[str, dict[str, Any]] = {}
        for (split, fname), part in zip(SPLIT_FILES.items(), splits, strict=True):
            payload = frame_csv_bytes(part)
            atomic_write_bytes(data_dir / fname, payload)
            files[fname] = sha256_bytes(payload)
            # from the part itself: random_split renumbers the rows, so ``labels`` (indexed like
            # the unsplit frame) would count the wrong rows
            part_labels = part[settings["label_column"]].astype(str).str.strip()
            counts[split] = {
                "rows": len(part),
                "labels": {k: int(v) for k, v in part_labels.value_counts().sort_index().items()},
            }
        meta = {
            "source": {"path": str(source), "sha256": src_sha, "bytes": len(data)},
            "settings": settings,
            "rows": {"read": len(table.frame), "used": len(frame)},
            "splits": counts,
            "files": files,
        }
        atomic_write_bytes(
            data_dir / META_NAME, (json.dumps(meta, indent=2) + "\n").encode("utf-8")
        )
        logger.info(
            "split %s into %s: train %d, validation %d, test %d rows",
            source,
            data_dir,
            *(c["rows"] for c in counts.values()),
        )
        return meta
