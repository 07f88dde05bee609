"""Read, validate, balance and split the SMS table exactly as chapter 6 does, and write the CSVs.

The chapter reads the TSV with ``pandas.read_csv(sep="\\t", header=None)``. Its quote handling
merges some physical lines into one row (the real file has 5,574 lines but 5,572 rows), so row
``i`` is not line ``i + 1``. To name the *line* of a bad row we split the text into records with a
small re-implementation of pandas' C tokenizer (``split_records``) that also tracks line numbers,
and we check that it agrees with pandas, row for row, on every file we read.
"""

from __future__ import annotations

import bisect
import codecs
import csv
import io
import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from filelock import FileLock

from spam_lightning.data.source import (
    DEFAULT_URLS,
    DOWNLOAD_TIMEOUT,
    DataError,
    atomic_write_bytes,
    clean_stale_temps,
    load_source,
    sha256_bytes,
)

logger = logging.getLogger(__name__)

COLUMNS = ("Label", "Text")
TSV_LABELS = ("ham", "spam")
LABEL_IDS = {"ham": 0, "spam": 1}
SPLIT_FILES = {"train": "train.csv", "validation": "validation.csv", "test": "test.csv"}
META_NAME = "meta.json"
LOCK_NAME = ".prepare.lock"
FORMAT_VERSION = 1
ON_BAD_ROWS = ("error", "skip")
MAX_LISTED = 5  # problems spelled out in one error message

_BREAK_RE = re.compile(r"\r\n|\r|\n")
_NON_UTF8_RE = re.compile("[\udc80-\udcff]")  # bytes decoded with errors="surrogateescape"


# --------------------------------------------------------------------------------------------
# Tokenizing: a line-tracking twin of pandas' C tokenizer (quotechar '"', doublequote, no
# escapechar, skip_blank_lines) so that every row maps back to the line where it starts.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    """One row as pandas sees it, with the 1-based lines it starts and ends on."""

    line: int
    end_line: int
    fields: tuple[str, ...]


(
    _START_RECORD,
    _START_FIELD,
    _IN_FIELD,
    _IN_QUOTED,
    _QUOTE_IN_QUOTED,
    _EAT_CRNL,
    _EAT_CRNL_NOP,
    _WHITESPACE_LINE,
) = range(8)


def split_records(text: str, sep: str) -> tuple[list[Record], int | None]:
    """Split ``text`` into records the way ``pandas.read_csv(sep=sep)`` (C engine) does.

    Returns the records and, if the text ends inside a quoted field (pandas: "EOF inside
    string"), the line where that unterminated record starts (it is not in the records).
    """
    breaks = [m.end() for m in _BREAK_RE.finditer(text)]

    def line_of(pos: int) -> int:
        return bisect.bisect_right(breaks, pos) + 1

    unquoted_special = re.compile("[" + re.escape(sep) + "\r\n]")
    records: list[Record] = []
    fields: list[str] = []
    buf: list[str] = []
    state, rec_start, ws_start, i, n = _START_RECORD, 0, 0, 0, len(text)

    def end_field() -> None:
        fields.append("".join(buf))
        buf.clear()

    def end_line(pos: int) -> None:
        records.append(Record(line_of(rec_start), line_of(max(pos, rec_start)), tuple(fields)))
        fields.clear()

    while i < n:
        c = text[i]
        if state == _IN_FIELD:  # quotes are literal here; only sep and line breaks matter
            m = unquoted_special.search(text, i)
            j = m.start() if m else n
            if j > i:
                buf.append(text[i:j])
                i = j
                continue
            end_field()
            if c == "\n":
                end_line(i)
                state = _START_RECORD
            elif c == "\r":
                state = _EAT_CRNL
            else:
                state = _START_FIELD
            i += 1
        elif state == _IN_QUOTED:
            j = text.find('"', i)
            if j < 0:
                buf.append(text[i:])
                i = n
                break
            buf.append(text[i:j])
            i = j + 1
            state = _QUOTE_IN_QUOTED
        elif state == _START_RECORD:
            if c == "\n":  # blank line: skipped
                i += 1
            elif c == "\r":
                state = _EAT_CRNL_NOP
                i += 1
            elif c in " \t" and c != sep:  # maybe a whitespace-only line (skipped)
                state, ws_start = _WHITESPACE_LINE, i
                i += 1
            else:
                state, rec_start = _START_FIELD, i  # reprocess c
        elif state == _START_FIELD:
            if c == "\n":
                end_field()
                end_line(i)
                state = _START_RECORD
            elif c == "\r":
                end_field()
                state = _EAT_CRNL
            elif c == '"':
                state = _IN_QUOTED
            elif c == sep:
                end_field()
            else:
                buf.append(c)
                state = _IN_FIELD
            i += 1
        elif state == _QUOTE_IN_QUOTED:
            if c == '"':  # "" inside quotes is one "
                buf.append('"')
                state = _IN_QUOTED
            elif c == sep:
                end_field()
                state = _START_FIELD
            elif c == "\n":
                end_field()
                end_line(i)
                state = _START_RECORD
            elif c == "\r":
                end_field()
                state = _EAT_CRNL
            else:  # pandas is lenient: "ab"cd -> abcd
                buf.append(c)
                state = _IN_FIELD
            i += 1
        elif state == _EAT_CRNL:
            if c == "\n":
                end_line(i)
                state = _START_RECORD
                i += 1
            elif c == sep:  # \r then a separator: a new record starting with an empty field
                end_line(i - 1)
                rec_start = i
                end_field()
                state = _START_FIELD
                i += 1
            else:
                end_line(i - 1)
                state = _START_RECORD  # reprocess c
        elif state == _EAT_CRNL_NOP:  # after a blank \r line pandas also eats a \n or a sep
            state = _START_RECORD
            if c == "\n" or c == sep:
                i += 1
        else:  # _WHITESPACE_LINE
            if c == "\n":
                state = _START_RECORD
                i += 1
            elif c == "\r":
                state = _EAT_CRNL_NOP
                i += 1
            elif c in " \t" and c != sep:
                i += 1
            else:  # not blank after all: parse the line from its start
                i = rec_start = ws_start
                state = _START_FIELD
    if state == _IN_QUOTED:
        return records, line_of(rec_start)
    if state in (_IN_FIELD, _START_FIELD, _QUOTE_IN_QUOTED):
        end_field()
        end_line(n - 1)
    elif state == _EAT_CRNL:
        end_line(n - 1)
    return records, None


# --------------------------------------------------------------------------------------------
# Reading + validation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    line: int
    message: str

    def format(self, name: str) -> str:
        return f"{name}, line {self.line}: {self.message}"


@dataclass
class Table:
    """The validated table (columns ``Label``, ``Text`` as strings) and each row's start line."""

    frame: pd.DataFrame
    lines: list[int]
    skipped: list[Problem]


def decode(data: bytes) -> str:
    """UTF-8 with undecodable bytes kept as lone surrogates so that we can report their line.

    A leading BOM is dropped, as pandas does."""
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    return data.decode("utf-8", errors="surrogateescape")


def _too_many_hint(sep: str) -> str:
    return "a tab inside the text?" if sep == "\t" else 'quote texts that contain "," or newlines'


def _check_record(
    rec: Record, sep: str, allowed: Sequence[str], bad_lines: list[tuple[int, int]]
) -> str | None:
    """Return what is wrong with one row (None if it is fine)."""
    problems: list[str] = []
    sep_name = "tab" if sep == "\t" else repr(sep)
    if len(rec.fields) != 2:
        found = len(rec.fields)
        why = f"no {sep_name}" if found == 1 else _too_many_hint(sep)
        problems.append(
            f"malformed line: expected 2 fields (Label{sep}Text) separated by a {sep_name}, "
            f"found {found} ({why})"
        )
    if any(_NON_UTF8_RE.search(f) for f in rec.fields):
        line, byte = next((ln, b) for ln, b in bad_lines if rec.line <= ln <= rec.end_line)
        problems.append(f"bytes that are not valid UTF-8 (first: 0x{byte:02x} on line {line})")
    elif rec.fields[0] not in allowed:
        problems.append(f"unknown label {rec.fields[0][:40]!r} (allowed: {', '.join(allowed)})")
    if len(rec.fields) == 2 and not rec.fields[1].strip():
        problems.append("empty text" if not rec.fields[1] else "text is only whitespace")
    if not problems:
        return None
    if rec.end_line > rec.line:
        problems.append(
            f"this row spans lines {rec.line}-{rec.end_line} (a field that starts with a quote "
            f"runs to the next closing quote)"
        )
    return "; ".join(problems)


def _pandas_read(data: bytes, sep: str, header: bool) -> pd.DataFrame:
    """The chapter's pandas call (plus ``dtype=str`` and no NA guessing: a text "NA" stays "NA")."""
    kwargs: dict[str, Any] = {"header": 0} if header else {"header": None, "names": list(COLUMNS)}
    return pd.read_csv(
        io.BytesIO(data), sep=sep, dtype=str, keep_default_na=False, na_filter=False, **kwargs
    )


def read_labeled(
    data: bytes,
    name: str,
    *,
    sep: str = "\t",
    header: bool = False,
    allowed: Sequence[str] = TSV_LABELS,
    on_bad_rows: str = "error",
    require_all_labels: bool = True,
    allow_empty: bool = False,
) -> Table:
    """Read a two-column ``Label<sep>Text`` table; every problem names ``name``, line, problem.

    ``on_bad_rows="skip"`` drops bad rows and logs how many (never silently).
    """
    if on_bad_rows not in ON_BAD_ROWS:
        raise ValueError(f"data.on_bad_rows={on_bad_rows!r}: allowed values are error, skip")
    if not data:
        raise DataError(f"{name}, line 1: the file is empty (0 bytes)")
    text = decode(data)
    bad_lines: list[tuple[int, int]] = []
    if _NON_UTF8_RE.search(text):
        breaks = [m.end() for m in _BREAK_RE.finditer(text)]
        bad_lines = [
            (bisect.bisect_right(breaks, m.start()) + 1, ord(m.group()) - 0xDC00)
            for m in _NON_UTF8_RE.finditer(text)
        ]
    records, unterminated = split_records(text, sep)
    problems: list[Problem] = []
    if header:
        if not records:
            raise DataError(f"{name}, line 1: no header line (expected {','.join(COLUMNS)})")
        head, records = records[0], records[1:]
        if head.fields != COLUMNS:
            raise DataError(
                f"{name}, line {head.line}: missing columns: expected the header "
                f"{sep.join(COLUMNS)!r}, found {sep.join(head.fields)[:80]!r}"
            )
    good: list[Record] = []
    for rec in records:
        msg = _check_record(rec, sep, allowed, bad_lines)
        if msg is None:
            good.append(rec)
        else:
            problems.append(Problem(rec.line, msg))
    if unterminated is not None:
        problems.append(
            Problem(
                unterminated,
                'malformed line: a field starts with a quote (") that is never closed, so '
                "the row runs to the end of the file",
            )
        )
    if problems and on_bad_rows == "error":
        listed = "\n".join("  " + p.format(name) for p in problems[:MAX_LISTED])
        more = (
            f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        )
        raise DataError(
            f"{name}: {len(problems)} bad row(s):\n{listed}{more}\n"
            f"(fix the file, or set data.on_bad_rows=skip to drop bad rows)"
        )
    if problems:
        logger.warning(
            "%s: skipped %d bad row(s) (data.on_bad_rows=skip); first: %s",
            name,
            len(problems),
            problems[0].format(name),
        )
    if not good and not allow_empty:
        raise DataError(f"{name}, line 1: no data rows")
    if require_all_labels and good:
        present = {r.fields[0] for r in good}
        for label in allowed:
            if label not in present:
                raise DataError(
                    f"{name}, lines {good[0].line}-{good[-1].line}: a class with no examples: "
                    f"no {label!r} rows among {len(good)} rows (need every label: "
                    f"{', '.join(allowed)})"
                )
    merged = [r for r in good if r.end_line > r.line]
    if merged:
        logger.info(
            "%s: %d row(s) span several lines because of quote characters (as pandas reads "
            "them), e.g. lines %d-%d",
            name,
            len(merged),
            merged[0].line,
            merged[0].end_line,
        )
    rows = [r.fields for r in good]
    if problems:
        frame = pd.DataFrame(rows, columns=list(COLUMNS), dtype="str")
    else:
        frame = _pandas_read(data, sep, header)
        if list(frame.itertuples(index=False, name=None)) != rows:
            raise RuntimeError(  # a bug in split_records, not in the data
                f"{name}: internal error: line mapping disagrees with pandas; please report"
            )
    return Table(frame, [r.line for r in good], problems)


def read_table(data: bytes, name: str, on_bad_rows: str = "error") -> Table:
    """The raw ``SMSSpamCollection`` TSV (``ham``/``spam`` labels), read as the chapter does."""
    return read_labeled(data, name, sep="\t", header=False, on_bad_rows=on_bad_rows)


def parse_split_csv(data: bytes, name: str) -> tuple[list[str], list[int]]:
    """A split CSV's bytes (``Label,Text``, labels 0/1) -> texts, labels."""
    table = read_labeled(
        data,
        name,
        sep=",",
        header=True,
        allowed=("0", "1"),
        require_all_labels=False,
        allow_empty=True,
    )
    return table.frame["Text"].tolist(), [int(v) for v in table.frame["Label"]]


def read_split_csv(path: str | os.PathLike[str]) -> tuple[list[str], list[int]]:
    """A prepared ``train/validation/test.csv`` -> texts, labels (errors name file + line)."""
    path = Path(path)
    return parse_split_csv(path.read_bytes(), str(path))


def csv_bytes(frame: pd.DataFrame) -> bytes:
    """The chapter's ``to_csv(index=None)`` bytes, checked to read back unchanged.

    pandas does not quote a bare carriage return, so such a text would come back altered; only
    then (never for the real data) every text is quoted instead.
    """
    expected = (frame["Text"].tolist(), frame["Label"].tolist())
    for quoting in (csv.QUOTE_MINIMAL, csv.QUOTE_NONNUMERIC):
        payload = frame.to_csv(index=None, quoting=quoting).encode("utf-8")
        try:
            if parse_split_csv(payload, "<csv>") == expected:
                return payload
        except DataError:
            pass
        if quoting == csv.QUOTE_MINIMAL:
            logger.info("a text does not survive the chapter's CSV quoting; quoting every text")
    raise RuntimeError("internal error: the split CSV does not read back unchanged")


# --------------------------------------------------------------------------------------------
# The chapter's balance and split
# --------------------------------------------------------------------------------------------


def balance(df: pd.DataFrame, seed: int = 123) -> pd.DataFrame:
    """``create_balanced_dataset``: ham downsampled to the spam count, ham then spam; 0/1 labels."""
    spam = df[df["Label"] == "spam"]
    ham = df[df["Label"] == "ham"]
    if len(ham) < len(spam):
        raise DataError(f"cannot balance: {len(ham)} ham rows < {len(spam)} spam rows")
    ham_subset = ham.sample(len(spam), random_state=seed)
    balanced = pd.concat([ham_subset, spam])
    balanced["Label"] = balanced["Label"].map(LABEL_IDS).astype("int64")
    return balanced


def random_split(
    df: pd.DataFrame, train_frac: float = 0.7, validation_frac: float = 0.1, seed: int = 123
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The chapter's ``random_split``: shuffle, then integer arithmetic -> 1,045 / 149 / 300."""
    df = df.sample(frac=1, random_state=seed).reset_index(drop=True)
    train_end = int(len(df) * train_frac)
    validation_end = train_end + int(len(df) * validation_frac)
    return df[:train_end], df[train_end:validation_end], df[validation_end:]


def check_splits_not_empty(
    name: str, rows: int, splits: Sequence[pd.DataFrame], train_frac: float, val_frac: float
) -> None:
    """An empty split would train on nothing or evaluate to NaN: refuse it before writing."""
    for split, part in zip(SPLIT_FILES, splits, strict=True):
        if len(part) == 0:
            raise DataError(
                f"{name}: the {split} split is empty: {rows} rows split with "
                f"data.train_frac={train_frac:g}, data.val_frac={val_frac:g} (train gets "
                f"int(rows * train_frac), validation int(rows * val_frac), test the rest); "
                f"use more rows or larger fractions"
            )


# --------------------------------------------------------------------------------------------
# Preparing a data folder (locked, atomic, reused when meta.json matches)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prepared:
    data_dir: Path
    paths: dict[str, Path]
    meta: dict[str, Any]
    reused: bool


def split_settings(
    split_seed: int, train_frac: float, val_frac: float, on_bad_rows: str
) -> dict[str, Any]:
    return {
        "format": FORMAT_VERSION,
        "split_seed": int(split_seed),
        "train_frac": float(train_frac),
        "val_frac": float(val_frac),
        "on_bad_rows": on_bad_rows,
    }


def read_meta(data_dir: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((data_dir / META_NAME).read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError, UnicodeDecodeError):
        return None
    return meta if isinstance(meta, dict) else None


def files_match(data_dir: Path, meta: dict[str, Any]) -> bool:
    """Every CSV recorded in ``meta`` exists with the recorded sha256."""
    recorded = meta.get("files", {})
    for fname in SPLIT_FILES.values():
        path = data_dir / fname
        if fname not in recorded or not path.is_file():
            return False
        if sha256_bytes(path.read_bytes()) != recorded[fname]:
            return False
    return True


def prepare(
    source: str | os.PathLike[str] | None,
    data_dir: str | os.PathLike[str],
    urls: Sequence[str] = DEFAULT_URLS,
    *,
    split_seed: int = 123,
    train_frac: float = 0.7,
    val_frac: float = 0.1,
    on_bad_rows: str = "error",
    timeout: float = DOWNLOAD_TIMEOUT,
) -> Prepared:
    """Get the source, then write ``train/validation/test.csv`` + ``meta.json`` in ``data_dir``.

    ``source``: ``bundled`` (or ``None``) for the packaged copy, ``download`` to fetch from
    ``urls`` into ``data_dir``, or a local file / zip (see ``source.load_source``).

    Guarded by a file lock so that concurrent processes (joblib sweeps) prepare once; reuses the
    CSVs when ``meta.json`` records the same source sha256 and split settings.
    """
    data_dir = Path(data_dir).expanduser().resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    settings = split_settings(split_seed, train_frac, val_frac, on_bad_rows)
    paths = {split: data_dir / fname for split, fname in SPLIT_FILES.items()}
    with FileLock(str(data_dir / LOCK_NAME)):
        clean_stale_temps(data_dir)
        src = load_source(source, urls, data_dir, timeout)
        src_sha = src.sha256
        meta = read_meta(data_dir)
        if (
            meta is not None
            and meta.get("settings") == settings
            and meta.get("source", {}).get("sha256") == src_sha
            and files_match(data_dir, meta)
        ):
            logger.info("reusing prepared data in %s", data_dir)
            return Prepared(data_dir, paths, meta, reused=True)
        (data_dir / META_NAME).unlink(missing_ok=True)  # no stale meta over half-new CSVs
        table = read_table(src.data, src.name, on_bad_rows=on_bad_rows)
        balanced = balance(table.frame, split_seed)
        splits = random_split(balanced, train_frac, val_frac, split_seed)
        check_splits_not_empty(src.name, len(balanced), splits, train_frac, val_frac)
        files: dict[str, str] = {}
        counts: dict[str, dict[str, int]] = {}
        for (split, path), frame in zip(paths.items(), splits, strict=True):
            payload = csv_bytes(frame)  # the chapter's to_csv
            atomic_write_bytes(path, payload)
            files[path.name] = sha256_bytes(payload)
            counts[split] = {
                "rows": len(frame),
                "ham": int((frame["Label"] == 0).sum()),
                "spam": int((frame["Label"] == 1).sum()),
            }
        meta = {
            "source": {**src.origin, "name": src.name, "sha256": src_sha, "bytes": len(src.data)},
            "settings": settings,
            "rows": {
                "read": len(table.frame),
                "skipped": len(table.skipped),
                "ham": int((table.frame["Label"] == "ham").sum()),
                "spam": int((table.frame["Label"] == "spam").sum()),
            },
            "splits": counts,
            "files": files,
        }
        atomic_write_bytes(
            data_dir / META_NAME, (json.dumps(meta, indent=2) + "\n").encode("utf-8")
        )
        logger.info(
            "prepared %s: train %d, validation %d, test %d rows",
            data_dir,
            *(c["rows"] for c in counts.values()),
        )
        return Prepared(data_dir, paths, meta, reused=False)


def load_prepared(data_dir: str | os.PathLike[str], settings: dict[str, Any]) -> dict[str, Path]:
    """Paths of the prepared CSVs; a clear error if ``prepare`` has not run for ``settings``."""
    data_dir = Path(data_dir).expanduser().resolve()
    meta = read_meta(data_dir)
    if meta is None or not files_match(data_dir, meta):
        raise DataError(
            f"{data_dir}: no prepared data (or it changed since); call prepare_data() first "
            f"(the Trainer does) or run scripts/prepare_data.py"
        )
    if meta.get("settings") != settings:
        raise DataError(
            f"{data_dir}/{META_NAME}: prepared with {meta.get('settings')}, but this run asks "
            f"for {settings}; call prepare_data() again"
        )
    return {split: data_dir / fname for split, fname in SPLIT_FILES.items()}
