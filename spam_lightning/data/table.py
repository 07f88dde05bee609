"""Read, validate, balance and split the SMS table as chapter 6 does; prepare data folders once.
The pinned file is read with the chapter's ``pd.read_csv``; a user's file with the ``csv`` module,
which splits rows as pandas does but knows their lines, so every bad row is named by file and line
(pandas' ``on_bad_lines`` silently drops rows it cannot split: 10 of the real file's)."""

from __future__ import annotations

import codecs
import contextlib
import csv
import io
import itertools
import json
import logging
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd

from spam_lightning.data.source import (
    DEFAULT_URLS,
    DOWNLOAD,
    DOWNLOAD_TIMEOUT,
    SOURCE_KEYWORDS,
    DataError,
    SourceData,
    cached_download,
    load_source,
    sha256_bytes,
)
from spam_lightning.io_utils import file_lock, remove_stale_temporaries, write_bytes, write_json
from spam_lightning.rules import choice_problems

logger = logging.getLogger(__name__)

COLUMNS = ("Label", "Text")
LABEL_IDS = {"ham": 0, "spam": 1}
SPLIT_FILES = {"train": "train.csv", "validation": "validation.csv", "test": "test.csv"}
META_NAME = "meta.json"
LOCK_NAME = ".prepare.lock"
FORMAT_VERSION = 1
ON_BAD_ROWS = ("error", "skip")
# data.split: chapter (gpt_class_finetune.py) or bonus (additional_experiments.py: one more shuffle)
SPLIT_PROCEDURES = ("chapter", "bonus")
MAX_LISTED = 5  # problems spelled out in one error message
SKIP_HINT = "(fix the file, or set data.on_bad_rows=skip to drop bad rows)"
_NON_UTF8_RE = re.compile("[\udc80-\udcff]")  # bytes decoded with errors="surrogateescape"
csv.field_size_limit(2**31 - 1)  # pandas has no limit on a field (the default: 128 KiB)


# ------------------------------------------------------------------ reading with line numbers
class Row(NamedTuple):
    line: int
    end_line: int
    fields: list[str]


def read_rows(text: str, sep: str, name: str) -> tuple[list[Row], int | None]:
    """The rows (blank lines skipped, as pandas) and the start line of a quoted field never
    closed, if any: a closing quote fed after the text ends it, or forms one extra row."""
    lines = list(io.StringIO(text, newline=""))  # split at \\r, \\n, \\r\\n only, as pandas
    reader = csv.reader(itertools.chain(lines, ['"\n']), delimiter=sep, strict=False)
    rows: list[Row] = []
    start = 1
    try:
        for fields in reader:
            if fields:
                rows.append(Row(start, reader.line_num, fields))
            start = reader.line_num + 1
    except csv.Error as e:  # e.g. a field over csv.field_size_limit()
        raise DataError(f"{name}, line {start}: malformed line: {e}") from e
    last = rows.pop()
    return rows, (last.line if last.line <= len(lines) else None)


@dataclass(frozen=True)
class Table:
    """Labels: strings, or class indices once mapped; ``lines``: each row's start line (None: our
    own CSVs, read unchecked); ``frame``: the rows as read, for splitting."""

    texts: list[str]
    labels: list[Any]
    name: str
    frame: pd.DataFrame | None = None
    lines: list[int] | None = None
    skipped: tuple[str, ...] = ()

    def line(self, row: int) -> int | str:
        return self.lines[row] if self.lines is not None else f"? (data row {row + 1})"


def _check_row(row: Row, cols: list[str], ti: int, li: int, sep: str,
               allowed: Sequence[str] | None, fixed: bool) -> str | None:
    """What is wrong with one row (None if it is fine)."""
    f, problems = row.fields, []
    if len(f) != len(cols):
        if not fixed:
            return f"expected {len(cols)} fields like the header, found {len(f)}"
        sep_name = "tab" if sep == "\t" else repr(sep)
        many = "a tab inside the text?" if sep == "\t" else 'quote texts that contain "," or newlines'
        problems.append(
            f"malformed line: expected {len(cols)} fields ({sep.join(cols)}) separated by a "
            f"{sep_name}, found {len(f)} ({f'no {sep_name}' if len(f) == 1 else many})"
        )
    if bad := next((m for x in f if (m := _NON_UTF8_RE.search(x))), None):
        problems.append(f"bytes that are not valid UTF-8 (first: 0x{ord(bad.group()) - 0xDC00:02x})")
    elif allowed is not None and f[li] not in allowed:
        problems.append(f"unknown label {f[li][:40]!r} (allowed: {', '.join(allowed)})")
    if len(f) == len(cols) and not f[ti].strip():
        problems.append("empty text" if not f[ti] else "text is only whitespace")
    if allowed is None and len(f) == len(cols) and not f[li].strip():
        problems.append(f"empty label (column {cols[li]!r})")
    if problems and row.end_line > row.line:
        problems.append(f"this row spans lines {row.line}-{row.end_line} (a field that starts "
                        f"with a quote runs to the next closing quote)")
    return "; ".join(problems) or None


# byte-order marks of the encodings a text file announces (UTF-32 first: it starts like UTF-16)
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


def decode_text(data: bytes, name: str) -> str:
    """A user's file as text: UTF-8 (a leading BOM dropped, as pandas does; bad bytes kept as lone
    surrogates, to name their rows), or UTF-16 / UTF-32 when a byte-order mark says so (Excel's
    "Unicode text"). UTF-16 without a mark: a DataError naming the encoding and the fix."""
    if encoding := next((enc for bom, enc in _BOMS if data.startswith(bom)), None):
        try:
            text = data.decode(encoding)
        except UnicodeDecodeError as e:
            raise DataError(f"{name}: starts with a {encoding.upper()} byte-order mark, but "
                            f"bytes {e.start}-{e.end - 1} are not valid {encoding.upper()}; save "
                            f"the file as UTF-8") from e
        logger.info("%s: read as %s (its byte-order mark)", name, encoding.upper())
        return text.removeprefix("\ufeff")
    head = data[:4096]  # UTF-16 without a mark: every other byte of ASCII text is NUL
    if max(head[0::2].count(0), head[1::2].count(0)) > len(head) // 4:
        nul = data.find(b"\x00")
        line = data.count(b"\n", 0, nul) + 1
        raise DataError(f"{name}, line {line}: NUL bytes (the first at "
                        f"byte {nul:,}): this looks like UTF-16 without a byte-order mark. Save "
                        f"it as UTF-8 (e.g. iconv -f UTF-16LE -t UTF-8 IN > OUT, or \"CSV "
                        f"UTF-8\" in a spreadsheet)")
    return data.removeprefix(codecs.BOM_UTF8).decode("utf-8", errors="surrogateescape")


def read_checked(
    data: bytes, name: str, sep: str = ",", *, fixed: Sequence[str] | None = None,
    header: bool = True, text_column: str = "Text", label_column: str = "Label",
    allowed: Sequence[str] | None = None, on_bad_rows: str = "error",
    require_all_labels: bool = False, allow_empty: bool = False, hint: str = SKIP_HINT,
) -> Table:
    """Read a user's table once, checking every row (each problem names file and line).
    ``fixed``: the exact columns, else the header's; ``allowed``: the labels, else any non-empty
    one (stripped); ``on_bad_rows="skip"`` drops bad rows and logs how many."""
    if not data:
        raise DataError(f"{name}, line 1: the file is empty (0 bytes)")
    text = decode_text(data, name)
    rows, unterminated = read_rows(text, sep, name)
    cols = list(fixed or ())
    if header:
        if not rows:
            what = f"expected {','.join(fixed)}" if fixed else "the file is blank"
            raise DataError(f"{name}, line 1: no header line ({what})")
        head, rows = rows[0].fields, rows[1:]
        if fixed and head != cols:
            raise DataError(f"{name}, line 1: missing columns: expected the header "
                            f"{sep.join(cols)!r}, found {sep.join(head)[:80]!r}")
        for option, column in (("data.text_column", text_column), ("data.label_column", label_column)):
            if column not in head:
                raise DataError(f"{name}, line 1: missing column {column!r} ({option}); the "
                                f"header has: {', '.join(map(repr, head))[:200]}")
        if len(set(head)) != len(head):
            raise DataError(f"{name}, line 1: duplicate column names in the header {head}")
        if not rows and unterminated is None and not allow_empty:
            raise DataError(f"{name}, line 2: no data rows (only a header)")
        cols = head
    ti, li = cols.index(text_column), cols.index(label_column)
    good, problems = [], []
    for row in rows:
        msg = _check_row(row, cols, ti, li, sep, allowed, fixed is not None)
        if msg is None:
            good.append(row)
        else:
            problems.append(f"{name}, line {row.line}: {msg}")
    if unterminated is not None:
        problems.append(f'{name}, line {unterminated}: malformed line: a field starts with a '
                        f'quote (") that is never closed, so the row runs to the end of the file')
    if problems and on_bad_rows == "error":  # the first MAX_LISTED, each "name, line N: what"
        listed = "\n".join(f"  {p}" for p in problems[:MAX_LISTED])
        extra = len(problems) - MAX_LISTED
        more = f"\n  ... and {extra} more" if extra > 0 else ""
        raise DataError(f"{name}: {len(problems)} bad row(s):\n{listed}{more}\n{hint}")
    if problems:
        logger.warning("%s: skipped %d bad row(s) (data.on_bad_rows=skip); first: %s", name,
                       len(problems), problems[0])
    if not good and not allow_empty:
        raise DataError(f"{name}, line 1: no data rows")
    present = {r.fields[li] for r in good}
    for label in allowed if require_all_labels and good else ():
        if label not in present:
            raise DataError(f"{name}, lines {good[0].line}-{good[-1].line}: a class with no "
                            f"examples: no {label!r} rows among {len(good)} rows (need every "
                            f"label: {', '.join(allowed)})")
    labels = [r.fields[li] if allowed is not None else r.fields[li].strip() for r in good]
    frame = pd.DataFrame([r.fields for r in good], columns=cols, dtype=str)
    return Table([r.fields[ti] for r in good], labels, name, frame, [r.line for r in good],
                 tuple(problems))


def read_table(data: bytes, name: str, on_bad_rows: str = "error") -> Table:
    """A user-supplied ``SMSSpamCollection`` TSV (``ham``/``spam`` labels), checked row by row."""
    return read_checked(data, name, "\t", fixed=COLUMNS, header=False, allowed=tuple(LABEL_IDS),
                        on_bad_rows=on_bad_rows, require_all_labels=True)


def read_text_table(data: bytes, name: str, text_column: str, label_column: str,
                    sep: str = ",") -> Table:
    """A user's CSV with a header (``data=csv``), checked row by row; labels are stripped."""
    sep_name = "tab" if sep == "\t" else repr(sep)
    hint = (f"(quote texts that contain {sep!r}, quotes or line breaks; set data.sep if the file "
            f"is not {sep_name}-separated)")
    return read_checked(data, name, sep, text_column=text_column, label_column=label_column,
                        hint=hint)


def parse_split_csv(data: bytes, name: str) -> tuple[list[str], list[int]]:
    """A split CSV's bytes (``Label,Text``, labels 0/1), checked -> texts, labels."""
    table = read_checked(data, name, ",", fixed=COLUMNS, allowed=("0", "1"), allow_empty=True)
    return table.texts, [int(v) for v in table.labels]


def read_split_csv(path: str | os.PathLike[str]) -> tuple[list[str], list[int]]:
    """A ``train/validation/test.csv`` in the chapter's format -> texts, labels (checked)."""
    return parse_split_csv(Path(path).read_bytes(), str(path))


def csv_bytes(frame: pd.DataFrame) -> bytes:
    """The chapter's ``to_csv(index=None)``; pandas leaves a bare carriage return unquoted (it
    would read back as a line break), so only then (never for the real data) texts are quoted."""
    quote_all = frame["Text"].str.contains("\r", regex=False).any()
    quoting = csv.QUOTE_NONNUMERIC if quote_all else csv.QUOTE_MINIMAL
    return frame.to_csv(index=None, quoting=quoting).encode("utf-8")


# ------------------------------------------------------------------ the chapter's balance and split
def shuffle(df: pd.DataFrame, seed: int = 123) -> pd.DataFrame:
    return df.sample(frac=1, random_state=seed).reset_index(drop=True)


def balance_for_split(df: pd.DataFrame, split: str = "chapter", seed: int = 123,
                      balance: bool = True) -> pd.DataFrame:
    """``create_balanced_dataset`` (ham downsampled to the spam count, ham then spam, 0/1 labels),
    shuffled once more for ``bonus`` as ``create_dataset_csvs`` does. ``balance=False``: every
    row in the file's order (all 4,825 ham of the collection), labels 0/1 as well."""
    spam, ham = df[df["Label"] == "spam"], df[df["Label"] == "ham"]
    if not balance:
        balanced = df.copy()
    elif len(ham) < len(spam):
        raise DataError(f"cannot balance: {len(ham)} ham rows < {len(spam)} spam rows")
    else:
        balanced = pd.concat([ham.sample(len(spam), random_state=seed), spam])
    balanced["Label"] = balanced["Label"].map(LABEL_IDS).astype("int64")
    return shuffle(balanced, seed) if split == "bonus" else balanced


def random_split(df: pd.DataFrame, train_frac: float, val_frac: float, seed: int,
                 name: str) -> dict[str, pd.DataFrame]:
    """The chapter's ``random_split`` (shuffle, then integer arithmetic -> 1,045 / 149 / 300);
    an empty split (nothing to train on, NaN metrics) is refused before anything is written."""
    df = shuffle(df, seed)
    train_end = int(len(df) * train_frac)
    val_end = train_end + int(len(df) * val_frac)
    splits = dict(zip(SPLIT_FILES, (df[:train_end], df[train_end:val_end], df[val_end:]), strict=True))
    if empty := next((split for split, part in splits.items() if len(part) == 0), None):
        raise DataError(f"{name}: the {empty} split is empty: {len(df)} rows split with "
                        f"data.train_frac={train_frac:g}, data.val_frac={val_frac:g} (train gets "
                        f"int(rows * train_frac), validation int(rows * val_frac), test the rest); "
                        f"use more rows or larger fractions")
    return splits


# ------------------------------------------------------------------ prepared folders (all datasets)
@contextlib.contextmanager
def locked(data_dir: Path) -> Iterator[None]:
    """Hold ``data_dir``'s lock (ranks and jobs prepare once), sweeping killed writers' temporaries;
    a folder that cannot be written is one DataError naming the fix."""
    held = contextlib.ExitStack()
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        if not os.access(data_dir, os.W_OK | os.X_OK):
            raise PermissionError("the folder is not writable by this user")
        held.enter_context(file_lock(data_dir / LOCK_NAME))
        remove_stale_temporaries(data_dir, recursive=False)
    except OSError as e:
        held.close()
        raise DataError(f"data.data_dir={data_dir}: cannot write there ("
                        f"{f'{e.filename}: ' if e.filename else ''}{e.strerror or e}), and it "
                        f"holds no prepared data for this source and these settings, so it must "
                        f"be (re)written; set data.data_dir to a writable folder") from e
    with held:
        yield


def read_meta(data_dir: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((data_dir / META_NAME).read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError, ValueError):  # (bad UTF-8: a ValueError too)
        return None  # data_dir (or a parent) a file: `locked` names it when preparing
    return meta if isinstance(meta, dict) else None


def matching_meta(data_dir: Path, settings: dict[str, Any], source: dict[str, Any]) -> dict | None:
    """``meta.json`` if ``load_prepared`` would accept the folder, else None."""
    with contextlib.suppress(DataError):
        return _prepared(data_dir, settings, source, "", "")[0]
    return None


def ensure_prepared(
    data_dir: Path, settings: dict[str, Any], identity: Callable[[bool], dict[str, Any] | None],
    build: Callable[[], tuple[dict[str, bytes], dict[str, Any]]], what: str,
) -> tuple[dict[str, Any], bool]:
    """``(meta, reused)``: reuse ``data_dir`` if ``meta.json`` records ``settings`` and
    ``identity(locked)`` (None: unknown until locked), with no lock; else under the lock check
    again, then write ``build() -> (csv bytes by split, meta)`` atomically, ``meta.json`` last."""
    source = identity(False) if read_meta(data_dir) is not None else None
    if source is not None and (meta := matching_meta(data_dir, settings, source)) is not None:
        logger.info("reusing prepared %s in %s", what, data_dir)
        return meta, True
    with locked(data_dir):
        if (meta := matching_meta(data_dir, settings, identity(True))) is not None:
            logger.info("reusing prepared %s in %s (prepared meanwhile)", what, data_dir)
            return meta, True
        parts, meta = build()
        (data_dir / META_NAME).unlink(missing_ok=True)  # no stale meta over half-new CSVs
        for split, payload in parts.items():
            write_bytes(data_dir / SPLIT_FILES[split], payload)
        files = {SPLIT_FILES[split]: sha256_bytes(payload) for split, payload in parts.items()}
        meta = {**meta, "settings": settings, "files": files}
        write_json(data_dir / META_NAME, meta)
        rows = {split: counts["rows"] for split, counts in meta["splits"].items()}
        logger.info("prepared %s in %s: %s", what, data_dir, rows)
        return meta, False


def load_prepared(data_dir: Path, settings: dict[str, Any], source: dict[str, Any], what: str,
                  ours: str, text_column: str, label_column: str) -> dict[str, Table]:
    """The splits ``prepare_data`` wrote for these settings and ``source`` (sha256-checked: read
    plainly); a folder re-prepared from another source is an error naming both (``ours``: ours)."""
    tables = {}
    for split, (path, payload) in _prepared(data_dir, settings, source, what, ours)[1].items():
        frame = pd.read_csv(io.BytesIO(payload), dtype=str, keep_default_na=False, na_filter=False)
        labels = frame[label_column].str.strip().tolist()
        tables[split] = Table(frame[text_column].tolist(), labels, str(path), frame)
    return tables


def _prepared(data_dir: Path, settings: dict[str, Any], source: dict[str, Any], what: str,
              ours: str) -> tuple[dict[str, Any], dict[str, tuple[Path, bytes]]]:
    meta = read_meta(data_dir)
    generic = DataError(f"{data_dir}: no prepared {what} with these settings (or it changed "
                        f"since); call prepare_data() first (the Trainer does). If another run "
                        f"shares this data.data_dir, give each its own")
    if meta is None or meta.get("settings") != settings:
        raise generic
    recorded = meta.get("source") or {}
    differ = [k for k, v in source.items() if recorded.get(k) != v]
    if differ:
        theirs = ", ".join(f"{k} {recorded.get(k)}" for k in differ)
        mine = ", ".join(f"{k} {source[k]}" for k in differ)
        origin = recorded.get("kind")
        named = (f"data.source={origin}" if origin in SOURCE_KEYWORDS else
                 recorded.get("name") or recorded.get("path") or recorded.get("url") or "unknown")
        raise DataError(f"{data_dir}: the prepared {what} there was made from another source: "
                        f"{named} ({theirs}), not {ours} ({mine}), the source this run was "
                        f"configured with (another run re-prepared this folder after this one's "
                        f"prepare_data). Rerun, or give each source its own data.data_dir")
    files = {}  # each split CSV read once, checked against the sha256 meta.json records
    for split, fname in SPLIT_FILES.items():
        try:
            payload = (data_dir / fname).read_bytes()
        except OSError:
            raise generic from None
        if sha256_bytes(payload) != (meta.get("files") or {}).get(fname):
            raise generic
        files[split] = (data_dir / fname, payload)
    return meta, files


# ------------------------------------------------------------------ preparing the SMS data
class Prepared(NamedTuple):
    data_dir: Path
    paths: dict[str, Path]
    meta: dict[str, Any]
    reused: bool


def settings_problems(on_bad_rows: Any, split: Any) -> list[str]:
    """``data.on_bad_rows`` and ``data.split``, each one of its choices."""
    return (choice_problems("data.on_bad_rows", on_bad_rows, ON_BAD_ROWS)
            + choice_problems("data.split", split, SPLIT_PROCEDURES))


def split_settings(seed: int, train_frac: float, val_frac: float, on_bad_rows: str,
                   split: str = "chapter", balance: bool = True) -> dict:
    """What ``meta.json`` records (``split`` unless ``chapter``, ``balance`` unless true: older
    folders stay valid; an unbalanced split is another identity, never reused for a balanced one)."""
    if problems := settings_problems(on_bad_rows, split):
        raise ValueError("\n  - ".join(problems))
    settings = {"format": FORMAT_VERSION, "split_seed": int(seed), "train_frac": float(train_frac),
                "val_frac": float(val_frac), "on_bad_rows": on_bad_rows}
    settings = settings if split == "chapter" else {**settings, "split": split}
    return settings if balance else {**settings, "balance": False}


def prepare(source: str | os.PathLike[str] | None, data_dir: str | os.PathLike[str],
            urls: Sequence[str] = DEFAULT_URLS, *, split_seed: int = 123, train_frac: float = 0.7,
            val_frac: float = 0.1, on_bad_rows: str = "error", timeout: float = DOWNLOAD_TIMEOUT,
            split: str = "chapter", balance: bool = True) -> Prepared:
    """Write the split CSVs + ``meta.json`` to ``data_dir`` (reused while nothing changed);
    ``balance=False`` keeps every ham message (the chapter downsamples ham to the spam count)."""
    data_dir = Path(data_dir).expanduser().resolve()
    settings = split_settings(split_seed, train_frac, val_frac, on_bad_rows, split, balance)
    src: SourceData | None = None

    def identity(locked: bool) -> dict[str, Any] | None:
        nonlocal src  # reused without the lock: a download is only looked for, never started
        if src is None:
            src = (load_source(source, urls, data_dir, timeout) if locked or str(source) != DOWNLOAD
                   else cached_download(data_dir))
        return None if src is None else {"sha256": src.sha256}

    def build() -> tuple[dict[str, bytes], dict[str, Any]]:
        assert src is not None
        if src.verified:  # the pinned file: the chapter's own read
            frame = pd.read_csv(io.BytesIO(src.data), sep="\t", header=None, names=list(COLUMNS))
            table = Table(frame["Text"].tolist(), frame["Label"].tolist(), src.name, frame)
        else:
            table = read_table(src.data, src.name, on_bad_rows=on_bad_rows)
        balanced = balance_for_split(table.frame, split, split_seed, balance)
        splits = random_split(balanced, train_frac, val_frac, split_seed, src.name)
        counts = {part: {"rows": len(f), **{k: int((f["Label"] == v).sum())
                                            for k, v in LABEL_IDS.items()}}
                  for part, f in splits.items()}
        rows = {"read": len(table.frame), "skipped": len(table.skipped),
                **{k: int((table.frame["Label"] == k).sum()) for k in LABEL_IDS}}
        origin = {**src.origin, "name": src.name, "sha256": src.sha256, "bytes": len(src.data)}
        return ({part: csv_bytes(f) for part, f in splits.items()},
                {"source": origin, "splits": counts, "rows": rows})

    meta, reused = ensure_prepared(data_dir, settings, identity, build, "data")
    return Prepared(data_dir, {part: data_dir / f for part, f in SPLIT_FILES.items()}, meta, reused)
