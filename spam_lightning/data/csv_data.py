"""Any text-classification CSV (three split files, or one split 70/10/20 like the chapter) and
IMDB (prepared as the book's bonus ``download_prepare_dataset.py`` does), through one pipeline."""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import re
import tarfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd

from spam_lightning.data.datamodule import (
    TextClassificationDataModule,
    int_problems,
    seed_problems,
    split_problems,
)
from spam_lightning.data.source import (
    DOWNLOAD_TIMEOUT,
    DataError,
    DownloadError,
    checked_path,
    download_first,
    os_problem,
    path_problem,
    read_local,
    sha256_bytes,
)
from spam_lightning.data.table import (
    SPLIT_FILES,
    Table,
    ensure_prepared,
    load_prepared,
    random_split,
    read_text_table,
)
from spam_lightning.data.tokens import PAD_TOKEN_ID
from spam_lightning.rules import bool_problems

logger = logging.getLogger(__name__)

CSV_FORMAT_VERSION = 1
# a user's CSV is read whole into memory: refuse anything larger before reading a byte
MAX_CSV_BYTES = 1024 * 1024 * 1024
_SEP_ALIASES = {"tab": "\t", "\\t": "\t", "comma": ",", "semicolon": ";"}
_INT_RE = re.compile(r"[+-]?\d+")


def natural_sorted(labels: Sequence[str]) -> list[str]:
    """Unique labels, numerically when all are integers (2 before 10), else as strings."""
    unique = set(labels)
    return sorted(unique, key=int) if all(_INT_RE.fullmatch(v) for v in unique) else sorted(unique)


# what pandas' read_csv turns into NaN (na_values' defaults, compared case-insensitively)
MISSING_LABELS = frozenset({"nan", "-nan", "na", "n/a", "#n/a", "#na", "<na>", "null", "none"})


def check_labels(table: Table, column: str = "label") -> None:
    """Labels that would silently become classes of their own (``data.class_names`` unset): a
    missing-value marker (``NaN``, ``null``, ...) or a class with a single example (a typo?).
    A DataError names the file, line, label, count and the fix."""
    counts: dict[str, int] = {}
    for label in table.labels:
        counts[label] = counts.get(label, 0) + 1
    first = {label: row for row, label in reversed(list(enumerate(table.labels)))}
    keep = "list every class in data.class_names=[...] to keep it as a class"
    if missing := [lab for lab in counts if lab.lower() in MISSING_LABELS]:
        label = missing[0]
        raise DataError(f"{table.name}, line {table.line(first[label])}: label {label!r} (column "
                        f"{column!r}, {counts[label]} row(s)) is a missing-value marker, which "
                        f"pandas reads as NaN: give these rows their labels or drop them, or "
                        f"{keep}")
    if len(counts) > 1 and (single := [lab for lab, n in counts.items() if n == 1]):
        others = ", ".join(f"{lab!r} {n:,}" for lab, n in sorted(counts.items()) if n > 1)
        label, more = single[0], f" ({len(single)} labels do)" if len(single) > 1 else ""
        raise DataError(f"{table.name}, line {table.line(first[label])}: label {label!r} (column "
                        f"{column!r}) occurs once{more}; the other classes have "
                        f"{others or 'one row each'} rows. A class needs examples to learn from "
                        f"and to test on; a typo? Fix or drop the row, or {keep}")


def to_splits(tables: dict[str, Table], class_names: Sequence[str] | None,
              label_column: str = "label") -> tuple[list[str], dict[str, Table]]:
    """Class names (given: matched by name, or as indices when no label is a name; else the
    sorted training labels, which every validation / test label must be) and class indices."""
    train = tables["train"]
    every = {lab for t in tables.values() for lab in t.labels}
    if class_names:
        names = list(class_names)
        by_index = not every & set(names) and all(_INT_RE.fullmatch(v) and 0 <= int(v) < len(names)
                                                  for v in every)
        lookup = {(str(i) if by_index else n): i for i, n in enumerate(names)}
        checked = list(tables)
    else:
        check_labels(train, label_column)
        names = natural_sorted(train.labels)
        lookup = {n: i for i, n in enumerate(names)}
        checked = ["validation", "test"]
    for table in (tables[split] for split in checked):
        for row, label in enumerate(table.labels):
            if label in lookup:
                continue
            where = f"{table.name}, line {table.line(row)}"
            if class_names:
                raise DataError(f"{where}: unknown label {label!r}; data.class_names={names} "
                                f"(labels must be one of these names, or integer indices "
                                f"0..{len(names) - 1} into them)")
            raise DataError(f"{where}: label {label!r} does not occur in the training split "
                            f"({train.name}), so the model could never predict it; the training "
                            f"labels are: {', '.join(names)}. Fix the label, or list every class "
                            f"in data.class_names=[...]")
    if len(names) < 2:
        raise DataError(f"{train.name}: only one class ({names[0]!r}) in the training labels; a "
                        f"classifier needs at least 2")
    missing = set(range(len(names))) - {lookup[lab] for lab in train.labels}
    if missing:
        missed = ", ".join(names[i] for i in sorted(missing))
        logger.warning("%s: no training examples of class(es) %s", train.name, missed)
    return names, {s: replace(t, labels=[lookup[lab] for lab in t.labels]) for s, t in tables.items()}


class CSVDataModule(TextClassificationDataModule):
    """Any text-classification CSV: three split files, or one file split 70/10/20 (seeded)."""

    def __init__(
        self, train: str | None = None, validation: str | None = None, test: str | None = None,
        source: str | None = None, text_column: str = "text", label_column: str = "label",
        class_names: Sequence[str] | None = None, sep: str | None = None, balance: bool = False,
        data_dir: str = "data/csv", split_seed: int = 123, train_frac: float = 0.7,
        val_frac: float = 0.1, max_length: int | str | None = None, context_length: int = 1024,
        padding: str = "longest", bucketing: bool = False, batch_size: int = 8,
        num_workers: int = 0, seed: int = 123, pad_token_id: int = PAD_TOKEN_ID,
    ) -> None:
        problems = split_problems(split_seed, train_frac, val_frac)
        names = None if class_names is None else [str(n) for n in class_names]
        if names is not None and (len(names) < 2 or len(set(names)) != len(names)
                                  or not all(n.strip() for n in names)):
            problems.append(f"data.class_names={names}: need at least 2 distinct, non-empty names "
                            f"(or null to take them from the data)")
        files = {"train": train, "validation": validation, "test": test}
        given = {k: v for k, v in files.items() if v is not None}
        if source is not None and given:
            problems.append(f"data.source={source} and data.{'/'.join(given)} are both set: give "
                            f"one file to split (data.source) or the three split files, not both")
        if source is None and len(given) < 3:
            missing = ", ".join(f"data.{k}" for k in files if k not in given)
            problems.append(f"data=csv needs data.train, data.validation and data.test (missing: "
                            f"{missing}), or data.source=ONE_FILE to split "
                            f"{train_frac}/{val_frac}/rest")
        if not text_column or not label_column or text_column == label_column:
            problems.append(f"data.text_column={text_column!r}, data.label_column="
                            f"{label_column!r}: need two different column names")
        problems += bool_problems(**{"data.balance": balance})
        if balance is True and source is None:
            problems.append("data.balance=true balances one file before it is split: it needs "
                            "data.source")
        tsv = Path(str(source or train)).suffix.lower() in (".tsv", ".tab")
        delimiter = ("\t" if tsv else ",") if sep is None else _SEP_ALIASES.get(str(sep), str(sep))
        if len(delimiter) != 1 or delimiter in ('"', "\n", "\r"):
            problems.append(f"data.sep={delimiter!r}: need one character (or tab, comma, "
                            f"semicolon)")
        super().__init__(data_dir, max_length, context_length, padding, bucketing, batch_size,
                         num_workers, seed, pad_token_id, problems)
        self.fixed_class_names = names
        # class_names: the LightningModule records the resolved names under that key, and the
        # logger merges both hparams (a null here, "from the data", would conflict with them)
        self.save_hyperparameters(ignore=["class_names"])
        self.files = {k: checked_path(f"data.{k}", v) for k, v in given.items()}
        self.source = None if source is None else checked_path("data.source", source)
        self.text_column, self.label_column = str(text_column), str(label_column)
        self.class_names = list(self.fixed_class_names or [])
        self.settings = {"format": CSV_FORMAT_VERSION, "kind": "csv", "sep": delimiter,
                         "text_column": self.text_column, "label_column": self.label_column,
                         "balance": bool(balance),
                         "split_seed": int(split_seed), "train_frac": float(train_frac),
                         "val_frac": float(val_frac)}

    def prepare_data(self) -> None:
        """Split ``data.source`` into ``data_dir`` (locked, atomic, reused); three files: nothing."""
        if self.source is not None:
            prepare_csv_split(self.source, self.data_dir, self.settings,
                              declared=bool(self.fixed_class_names))

    def load_splits(self) -> dict[str, Table]:
        cols = (self.text_column, self.label_column)
        if self.source is None:  # the user's own files: checked
            tables = {s: read_text_table(read_local(p, f"data.{s}", MAX_CSV_BYTES), str(p), *cols,
                                         self.settings["sep"]) for s, p in self.files.items()}
        else:  # checked against the source as it is now (every rank: cheap, one hash)
            data = read_local(self.source, "data.source", MAX_CSV_BYTES)
            identity = {"path": str(self.source), "sha256": sha256_bytes(data)}
            tables = load_prepared(self.data_dir, self.settings, identity,
                                   f"split of {self.source}", f"data.source={self.source}", *cols)
        self.class_names, splits = to_splits(tables, self.fixed_class_names, self.label_column)
        return splits


def prepare_csv_split(source: Path, data_dir: Path, settings: dict[str, Any],
                      declared: bool = False) -> dict[str, Any]:
    """Shuffle + split one CSV into ``data_dir`` (every cell quoted: any text reads back as is)."""
    data = read_local(source, "data.source", MAX_CSV_BYTES)  # the lock guards data_dir only
    identity = {"path": str(source), "sha256": sha256_bytes(data)}  # what meta.json records

    def build() -> tuple[dict[str, bytes], dict[str, Any]]:
        cols = settings["text_column"], settings["label_column"]
        table = read_text_table(data, str(source), *cols, settings["sep"])
        if not declared:  # data.class_names: the classes are taken as declared
            check_labels(table, cols[1])
        frame, seed = table.frame, settings["split_seed"]
        if settings["balance"]:  # every class downsampled to the rarest one's count (as chapter 6)
            labels = pd.Series(table.labels, index=frame.index)
            smallest = int(labels.value_counts().min())
            frame = pd.concat(frame[labels == label].sample(smallest, random_state=seed)
                              for label in natural_sorted(table.labels))
        fracs = settings["train_frac"], settings["val_frac"]
        splits = random_split(frame, *fracs, seed, str(source))
        counts = {}
        for split, part in splits.items():
            labels = part[settings["label_column"]].str.strip().value_counts().sort_index()
            counts[split] = {"rows": len(part), "labels": {k: int(v) for k, v in labels.items()}}
        parts = {s: p.to_csv(index=False, quoting=csv.QUOTE_ALL).encode("utf-8")
                 for s, p in splits.items()}
        return parts, {"source": {**identity, "bytes": len(data)},
                       "rows": {"read": len(table.frame), "used": len(frame)}, "splits": counts}

    return ensure_prepared(data_dir, settings, lambda _: identity, build, f"split of {source}")[0]


# ------------------------------------------------------------------ IMDB, as the book's bonus script

IMDB_URLS: tuple[str, ...] = ("https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz",)
ARCHIVE_NAME = "aclImdb_v1.tar.gz"
MAX_ARCHIVE_BYTES = 256 * 1024 * 1024  # the real archive is about 84 MB (local ones too)
MAX_REVIEW_BYTES = 1024 * 1024  # one review (the longest real one is about 14 KB)
MAX_REVIEWS_BYTES = 1024 * 1024 * 1024  # all reviews read (the real ones: about 130 MB)
IMDB_FORMAT_VERSION = 1
CLASS_NAMES = ("negative", "positive")
COLUMNS = ("text", "label")  # the book's CSVs
# the book's reading order: subsets, then labels (1 = pos, 0 = neg), then files sorted by name
ORDER = [(subset, label) for subset in ("test", "train") for label in ("pos", "neg")]
IMDB_HINT = (f"Fix: download {IMDB_URLS[0]} by other means and pass "
             f"data.source=/path/to/{ARCHIVE_NAME} (or the extracted aclImdb folder).")
_MEMBER_RE = re.compile(r"^(?:\./)?(?:.*/)?aclImdb/(train|test)/(pos|neg)/([^/]+\.txt)$")

Reviews = dict[tuple[str, str], list[tuple[str, str]]]  # (subset, label) -> [(file name, text)]


def _review(raw: bytes, where: str) -> str:
    """A review as the book's ``open(..., encoding="utf-8").read()`` gives it (universal newlines)."""
    try:
        return raw.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: bytes that are not valid UTF-8 at offset {e.start}") from e


def _review_files(folder: Path) -> Iterator[tuple[str, str, str, Path, os.stat_result]]:
    """(subset, label, name, path, stat) of each ``*.txt`` review, in the book's order."""
    roots = (folder, folder / "aclImdb")
    root = next((r for r in roots if all((r / s / lab).is_dir() for s, lab in ORDER)), None)
    if root is None:
        raise DataError(f"data.source: {folder}: not an extracted IMDB folder (expected aclImdb/"
                        f"train/pos, train/neg, test/pos and test/neg holding *.txt reviews)")
    for subset, label in ORDER:
        where = root / subset / label
        try:
            with os.scandir(where) as entries:
                found = sorted((e.name, Path(e.path), e.stat()) for e in entries
                               if e.name.endswith(".txt"))
        except OSError as e:
            raise DataError(f"data.source: {where}: {os_problem(e)}") from e
        yield from ((subset, label, *f) for f in found)


def _check_archive(archive: Path) -> None:
    """A local ``.tar.gz`` must be a readable regular file within the download's size cap."""
    problem = path_problem(archive)
    if problem is None and (size := archive.stat().st_size) > MAX_ARCHIVE_BYTES:
        problem = f"{size:,} bytes, over the {MAX_ARCHIVE_BYTES:,}-byte limit for data.source"
    if problem is not None:
        raise DataError(f"data.source: {archive}: {problem}")


def read_reviews(source: Path) -> Reviews:
    """The reviews of an extracted folder or streamed from the ``.tar.gz``, sorted by file name
    as the book's ``sorted(os.listdir(...))``, each (and all) read with a size cap."""
    reviews: Reviews = {key: [] for key in ORDER}
    total = 0

    def capped(size: int, where: str) -> None:
        nonlocal total
        total += size
        if size > MAX_REVIEW_BYTES:
            raise DataError(f"{where}: {size:,} bytes, over the {MAX_REVIEW_BYTES:,}-byte limit "
                            f"for one review")
        if total > MAX_REVIEWS_BYTES:
            raise DataError(f"{where}: the reviews read so far exceed the {MAX_REVIEWS_BYTES:,}-"
                            f"byte limit for data.source (is this the IMDB archive "
                            f"aclImdb_v1.tar.gz?)")

    if source.is_dir():
        for subset, label, name, path, _ in _review_files(source):
            raw = read_local(path, "data.source", MAX_REVIEW_BYTES)
            capped(len(raw), str(path))
            reviews[(subset, label)].append((name, _review(raw, str(path))))
        return reviews
    _check_archive(source)
    try:
        with tarfile.open(source, mode="r:gz") as tar:
            for member in tar:
                match = _MEMBER_RE.match(member.name)
                if match and member.isfile():
                    subset, label, name = match.groups()
                    where = f"{source}!{member.name}"
                    capped(member.size, where)
                    # tarfile reads at most member.size bytes: the header bounds what is read
                    raw = tar.extractfile(member).read(MAX_REVIEW_BYTES + 1)  # type: ignore[union-attr]
                    reviews[(subset, label)].append((name, _review(raw, where)))
    except (tarfile.TarError, zlib.error, EOFError, OSError) as e:
        raise DataError(f"{source}: not a readable .tar.gz (corrupt or truncated): {e}") from e
    if empty := [f"{s}/{lab}" for (s, lab), rows in reviews.items() if not rows]:
        raise DataError(f"{source}: no reviews under aclImdb/{', aclImdb/'.join(empty)} (is this "
                        f"the IMDB archive aclImdb_v1.tar.gz?)")
    return {key: sorted(rows) for key, rows in reviews.items()}


def book_partition(reviews: Reviews, sizes: Sequence[int | None],
                   seed: int = 123) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """``load_dataset_to_dataframe`` + ``partition_and_save``: shuffled twice, then the first /
    next / remaining rows (``sizes[2]`` None: all the rest)."""
    texts = [text for key in ORDER for _, text in reviews[key]]
    labels = [int(key[1] == "pos") for key in ORDER for _ in reviews[key]]
    df = pd.DataFrame({"text": texts, "label": labels})
    train_size, val_size, test_size = sizes
    need = train_size + val_size + (test_size or 1)
    if len(df) < need:
        raise DataError(f"the IMDB data has {len(df):,} reviews, fewer than data.train_size + "
                        f"data.val_size + data.test_size = {need:,}")
    for _ in range(2):
        df = df.sample(frac=1, random_state=seed).reset_index(drop=True)
    val_end = train_size + val_size
    test_end = None if test_size is None else val_end + test_size
    return df.iloc[:train_size], df.iloc[train_size:val_end], df.iloc[val_end:test_end]


def _imdb_identity(source: Path | None, data_dir: Path) -> dict[str, Any]:
    """The source's ``meta.json`` identity, never downloading: a folder's fingerprint, an
    archive's sha256 (none while the default archive is not downloaded yet)."""
    if source is not None and source.is_dir():
        digest = hashlib.sha256()  # names, sizes and mtimes: a cheap change detector
        for subset, label, name, _, st in _review_files(source):
            digest.update(f"{subset}/{label}/{name}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
        return {"kind": "folder", "path": str(source), "fingerprint": digest.hexdigest()}
    archive = source if source is not None else data_dir / ARCHIVE_NAME
    identity: dict[str, Any] = {"kind": "archive", "path": str(archive)}
    if source is None and not archive.is_file():
        return identity
    _check_archive(archive)
    digest = hashlib.sha256()
    try:
        with open(archive, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    except OSError as e:
        raise DataError(f"data.source: {archive}: {os_problem(e)}") from e
    return {**identity, "sha256": digest.hexdigest()}


def prepare_imdb(source: Path | None, data_dir: Path, urls: Sequence[str] = IMDB_URLS,
                 sizes: Sequence[int | None] = (35_000, 5_000, 10_000), seed: int = 123,
                 timeout: float = DOWNLOAD_TIMEOUT) -> dict[str, Any]:
    """Write the book's ``train/validation/test.csv`` + ``meta.json`` (locked, atomic, reused)."""
    settings = imdb_settings(sizes, seed)
    origin: dict[str, Any] = {}

    def identity(locked: bool) -> dict[str, Any] | None:
        archive = data_dir / ARCHIVE_NAME  # downloaded only under the lock
        if locked and source is None and not archive.is_file():
            if not urls:
                raise DownloadError(f"no data.source and no data.urls to download from. {IMDB_HINT}")
            origin["url"] = download_first(  # read_reviews verifies: whole gzip, four folders
                urls, archive, read_reviews, ARCHIVE_NAME, IMDB_HINT, timeout, MAX_ARCHIVE_BYTES)
        found = _imdb_identity(source, data_dir)
        origin.update(found)
        return found if "sha256" in found or "fingerprint" in found else None

    def build() -> tuple[dict[str, bytes], dict[str, Any]]:
        reviews = read_reviews(Path(origin["path"]))
        parts = dict(zip(SPLIT_FILES, book_partition(reviews, sizes, seed), strict=True))
        counts = {split: {"rows": len(p), "negative": int((p["label"] == 0).sum()),
                          "positive": int((p["label"] == 1).sum())} for split, p in parts.items()}
        return {s: p.to_csv(index=False).encode("utf-8") for s, p in parts.items()}, {
            "source": origin, "splits": counts,
            "reviews": {f"{s}/{lab}": len(reviews[(s, lab)]) for s, lab in ORDER}}

    return ensure_prepared(data_dir, settings, identity, build, "IMDB data")[0]


def imdb_settings(sizes: Sequence[int | None], seed: int) -> dict[str, Any]:
    sizes = [None if s is None else int(s) for s in sizes]
    return {"format": IMDB_FORMAT_VERSION, "kind": "imdb", "sizes": sizes, "seed": int(seed)}


class IMDBDataModule(TextClassificationDataModule):
    """IMDB sentiment (negative / positive) with the book's bonus split, through the CSV pipeline."""

    def __init__(
        self, source: str | None = None, urls: Sequence[str] = IMDB_URLS,
        data_dir: str = "data/imdb", train_size: int = 35_000, val_size: int = 5_000,
        test_size: int | None = 10_000, shuffle_seed: int = 123,
        class_names: Sequence[str] = CLASS_NAMES, max_length: int | str | None = 256,
        context_length: int = 1024, padding: str = "longest", bucketing: bool = False,
        batch_size: int = 8, num_workers: int = 0, seed: int = 123,
        pad_token_id: int = PAD_TOKEN_ID,
    ) -> None:
        names, urls = [str(n) for n in class_names], [str(u) for u in (urls or ())]
        problems = int_problems(train_size=(train_size, 1), val_size=(val_size, 0),
                                test_size=(1 if test_size is None else test_size, 1))
        problems += seed_problems(shuffle_seed=shuffle_seed)
        if len(names) != 2 or len(set(names)) != 2:
            problems.append(f"data.class_names={names}: IMDB has 2 classes (negative, positive)")
        if source is None and not urls:
            problems.append("data.source is null and data.urls is empty: nothing to read")
        super().__init__(data_dir, max_length, context_length, padding, bucketing, batch_size,
                         num_workers, seed, pad_token_id, problems)
        self.source = None if source is None else checked_path(
            "data.source", source, f"no such file or folder (expected {ARCHIVE_NAME} or the "
            "extracted aclImdb folder)", folder=True)
        self.urls = urls
        # class_names: recorded (resolved) by the LightningModule under the same key
        self.save_hyperparameters(ignore=["class_names"])
        self.sizes = (int(train_size), int(val_size), None if test_size is None else int(test_size))
        self.shuffle_seed = int(shuffle_seed)
        self.class_names = names

    def prepare_data(self) -> None:
        """Download (or read ``data.source``) and write the book's split CSVs (locked, reused)."""
        prepare_imdb(self.source, self.data_dir, self.urls, self.sizes, self.shuffle_seed)

    def load_splits(self) -> dict[str, Table]:
        settings = imdb_settings(self.sizes, self.shuffle_seed)
        identity = _imdb_identity(self.source, self.data_dir)  # the source as it is now
        ours = f"data.source={self.source or 'null (the download)'}"
        tables = load_prepared(self.data_dir, settings, identity, "IMDB data", ours, *COLUMNS)
        self.class_names, splits = to_splits(tables, self.class_names)
        return splits
