"""``IMDBDataModule``: the 50k IMDB movie reviews, prepared as the book's bonus material does.

``ch06/03_bonus_imdb-classification/download_prepare_dataset.py``: read
``aclImdb/{test,train}/{pos,neg}/*.txt`` in that order (files sorted by name, label 1 = pos,
0 = neg), shuffle with ``random_state=123``, shuffle again with ``random_state=123``, and write the
first 35,000 rows to ``train.csv``, the next 5,000 to ``validation.csv`` and the rest (10,000) to
``test.csv``, columns ``text,label``. The split sizes are options (tests use a small folder).

The archive is downloaded atomically (temporary file, then rename) and read member by member
straight from the ``.tar.gz``: nothing else is unpacked, so there is no half-extracted folder to
clean up, and the 50k unlabelled reviews we do not use are never written to disk. ``data.source``
accepts the ``.tar.gz`` or an already extracted ``aclImdb`` folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tarfile
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from filelock import FileLock

from spam_lightning.data.csv_data import load_csv_splits
from spam_lightning.data.datamodule import SplitData, TextClassificationDataModule, _int_at_least
from spam_lightning.data.source import (
    DOWNLOAD_TIMEOUT,
    DataError,
    DownloadError,
    _fetch,
    atomic_write_bytes,
    clean_stale_temps,
    sha256_bytes,
    temp_path,
)
from spam_lightning.data.table import LOCK_NAME, META_NAME, SPLIT_FILES, files_match, read_meta
from spam_lightning.data.tokens import PAD_TOKEN_ID

logger = logging.getLogger(__name__)

IMDB_URLS: tuple[str, ...] = ("https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz",)
ARCHIVE_NAME = "aclImdb_v1.tar.gz"
MAX_ARCHIVE_BYTES = 256 * 1024 * 1024  # the real archive is about 84 MB
IMDB_FORMAT_VERSION = 1
LABELS = {"pos": 1, "neg": 0}
CLASS_NAMES = ("negative", "positive")
# the book's reading order: subsets, then labels, then files sorted by name
ORDER = [(subset, label) for subset in ("test", "train") for label in ("pos", "neg")]
FIX_HINT = (
    f"Fix: download {IMDB_URLS[0]} by other means and pass data.source=/path/to/{ARCHIVE_NAME} "
    f"(or the extracted aclImdb folder)."
)
_MEMBER_RE = re.compile(r"^(?:\./)?(?:.*/)?aclImdb/(train|test)/(pos|neg)/([^/]+\.txt)$")

Reviews = dict[tuple[str, str], list[tuple[str, str]]]  # (subset, label) -> [(file name, text)]


def _text(raw: bytes, where: str) -> str:
    """A review as the book's ``open(..., encoding="utf-8").read()`` returns it (universal newlines)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: bytes that are not valid UTF-8 at offset {e.start}") from e
    return text.replace("\r\n", "\n").replace("\r", "\n")


def imdb_root(folder: Path) -> Path:
    """``folder`` itself when it holds ``train/`` and ``test/``, else ``folder/aclImdb``."""
    for root in (folder, folder / "aclImdb"):
        if all((root / subset / label).is_dir() for subset, label in ORDER):
            return root
    raise DataError(
        f"data.source: {folder}: not an extracted IMDB folder (expected aclImdb/train/pos, "
        f"train/neg, test/pos and test/neg holding *.txt reviews)"
    )


def read_reviews_from_folder(folder: Path) -> Reviews:
    root = imdb_root(folder)
    reviews: Reviews = {}
    for subset, label in ORDER:
        path = root / subset / label
        names = sorted(n for n in os.listdir(path) if n.endswith(".txt"))
        reviews[(subset, label)] = [
            (n, _text((path / n).read_bytes(), str(path / n))) for n in names
        ]
    return reviews


def read_reviews_from_tar(archive: Path) -> Reviews:
    """Stream the labelled reviews out of the ``.tar.gz`` (no extraction to disk)."""
    reviews: Reviews = {key: [] for key in ORDER}
    try:
        with tarfile.open(archive, mode="r:gz") as tar:
            for member in tar:
                match = _MEMBER_RE.match(member.name)
                if not match or not member.isfile():
                    continue
                subset, label, name = match.groups()
                data = tar.extractfile(member)
                assert data is not None  # a regular file
                reviews[(subset, label)].append(
                    (name, _text(data.read(), f"{archive}!{member.name}"))
                )
    except (tarfile.TarError, zlib.error, EOFError, OSError) as e:
        raise DataError(f"{archive}: not a readable .tar.gz (corrupt or truncated): {e}") from e
    empty = [f"{s}/{lab}" for (s, lab), rows in reviews.items() if not rows]
    if empty:
        raise DataError(
            f"{archive}: no reviews under aclImdb/{', aclImdb/'.join(empty)} (is this the IMDB "
            f"archive aclImdb_v1.tar.gz?)"
        )
    for rows in reviews.values():
        rows.sort()  # the book's sorted(os.listdir(...))
    return reviews


def book_frame(reviews: Reviews, seed: int = 123) -> pd.DataFrame:
    """``load_dataset_to_dataframe``: every review in the book's order, then shuffled."""
    texts = [text for key in ORDER for _, text in reviews[key]]
    labels = [LABELS[key[1]] for key in ORDER for _ in reviews[key]]
    df = pd.DataFrame({"text": texts, "label": labels})
    return df.sample(frac=1, random_state=seed).reset_index(drop=True)


def book_partition(
    df: pd.DataFrame, sizes: Sequence[int | None], seed: int = 123
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """``partition_and_save``: shuffle again, then the first / next / remaining rows.

    ``sizes[2]`` None takes every remaining row (the book); an int takes that many.
    """
    train_size, val_size, test_size = sizes
    need = train_size + val_size + (test_size or 1)
    if len(df) < need:
        raise DataError(
            f"the IMDB data has {len(df):,} reviews, fewer than data.train_size + data.val_size "
            f"+ data.test_size = {need:,}"
        )
    shuffled = df.sample(frac=1, random_state=seed).reset_index(drop=True)
    train_end = train_size
    val_end = train_end + val_size
    test_end = None if test_size is None else val_end + test_size
    return (
        shuffled.iloc[:train_end],
        shuffled.iloc[train_end:val_end],
        shuffled.iloc[val_end:test_end],
    )


def _folder_fingerprint(folder: Path) -> str:
    """Names, sizes and modification times of the reviews: a cheap change detector for a folder."""
    root = imdb_root(folder)
    digest = hashlib.sha256()
    for subset, label in ORDER:
        with os.scandir(root / subset / label) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                st = entry.stat()
                digest.update(
                    f"{subset}/{label}/{entry.name}\t{st.st_size}\t{st.st_mtime_ns}\n".encode()
                )
    return digest.hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def download_archive(urls: Sequence[str], dest: Path, timeout: float = DOWNLOAD_TIMEOUT) -> str:
    """Try each URL; keep the archive at ``dest`` only once it reads as the IMDB archive."""
    if not urls:
        raise DownloadError(f"no data.source and no data.urls to download from. {FIX_HINT}")
    failures: list[str] = []
    for url in urls:
        try:
            logger.info("downloading %s", url)
            with temp_path(dest.parent, "download") as tmp:
                _fetch(url, tmp, timeout, max_bytes=MAX_ARCHIVE_BYTES)
                read_reviews_from_tar(tmp)  # verifies: complete gzip stream, the four folders
                os.replace(tmp, dest)
            logger.info("saved %s (%s bytes) from %s", dest, f"{dest.stat().st_size:,}", url)
            return url
        except Exception as e:  # every failure is reported below
            logger.warning("download failed: %s: %s", url, e)
            failures.append(f"  - {url}: {e if isinstance(e, DataError) else repr(e)}")
    raise DownloadError(
        f"could not get {ARCHIVE_NAME}; tried every URL in data.urls:\n"
        + "\n".join(failures)
        + f"\n{FIX_HINT}"
    )


def _source_reviews(
    source: Path | None, urls: Sequence[str], data_dir: Path, timeout: float
) -> tuple[dict[str, Any], Callable[[], Reviews]]:
    """What identifies the source (for ``meta.json`` reuse) and a reader of its reviews.

    Reading is deferred: when the prepared CSVs are reused, the 50k reviews are never read.
    """
    if source is not None and source.is_dir():
        origin = {"kind": "folder", "path": str(source), "fingerprint": _folder_fingerprint(source)}
        return origin, lambda: read_reviews_from_folder(source)
    archive = source if source is not None else data_dir / ARCHIVE_NAME
    origin: dict[str, Any] = {"kind": "archive", "path": str(archive)}
    if source is None and not archive.is_file():
        origin["url"] = download_archive(urls, archive, timeout)
    origin["sha256"] = _file_sha256(archive)
    return origin, lambda: read_reviews_from_tar(archive)


def prepare_imdb(
    source: Path | None,
    data_dir: Path,
    urls: Sequence[str] = IMDB_URLS,
    sizes: Sequence[int | None] = (35_000, 5_000, 10_000),
    seed: int = 123,
    timeout: float = DOWNLOAD_TIMEOUT,
) -> dict[str, Any]:
    """Write the book's ``train/validation/test.csv`` (``text,label``) + ``meta.json`` into ``data_dir``.

    Locked (DDP ranks and sweep jobs prepare once) and reused while the source and the settings
    match; every file is written to a temporary name first and renamed when complete.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    settings = imdb_settings(sizes, seed)
    with FileLock(str(data_dir / LOCK_NAME)):
        clean_stale_temps(data_dir)
        origin, reader = _source_reviews(source, urls, data_dir, timeout)
        meta = read_meta(data_dir)
        same_source = meta is not None and {
            k: v for k, v in meta.get("source", {}).items() if k != "url"
        } == {k: v for k, v in origin.items() if k != "url"}
        if same_source and meta.get("settings") == settings and files_match(data_dir, meta):
            logger.info("reusing prepared IMDB data in %s", data_dir)
            return meta
        (data_dir / META_NAME).unlink(missing_ok=True)
        reviews = reader()
        parts = book_partition(book_frame(reviews, seed), sizes, seed)
        files: dict[str, str] = {}
        counts: dict[str, dict[str, int]] = {}
        for (split, fname), part in zip(SPLIT_FILES.items(), parts, strict=True):
            payload = part.to_csv(index=False).encode("utf-8")  # the book's to_csv
            atomic_write_bytes(data_dir / fname, payload)
            files[fname] = sha256_bytes(payload)
            counts[split] = {
                "rows": len(part),
                "negative": int((part["label"] == 0).sum()),
                "positive": int((part["label"] == 1).sum()),
            }
        meta = {
            "source": origin,
            "settings": settings,
            "reviews": {f"{s}/{lab}": len(reviews[(s, lab)]) for s, lab in ORDER},
            "splits": counts,
            "files": files,
        }
        atomic_write_bytes(data_dir / META_NAME, (json.dumps(meta, indent=2) + "\n").encode())
        logger.info(
            "prepared IMDB in %s: train %d, validation %d, test %d reviews",
            data_dir,
            *(c["rows"] for c in counts.values()),
        )
        return meta


def imdb_settings(sizes: Sequence[int | None], seed: int) -> dict[str, Any]:
    return {
        "format": IMDB_FORMAT_VERSION,
        "kind": "imdb",
        "sizes": [None if s is None else int(s) for s in sizes],
        "seed": int(seed),
    }


class IMDBDataModule(TextClassificationDataModule):
    """IMDB sentiment (negative / positive) with the book's bonus split, through the CSV pipeline."""

    def __init__(
        self,
        source: str | None = None,
        urls: Sequence[str] = IMDB_URLS,
        data_dir: str = "data/imdb",
        train_size: int = 35_000,
        val_size: int = 5_000,
        test_size: int | None = 10_000,
        shuffle_seed: int = 123,
        class_names: Sequence[str] = CLASS_NAMES,
        max_length: int | str | None = 256,
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
        _int_at_least("data.train_size", train_size, 1)
        _int_at_least("data.val_size", val_size, 0)
        if test_size is not None:
            _int_at_least("data.test_size", test_size, 1)
        _int_at_least("data.shuffle_seed", shuffle_seed, 0)
        names = [str(n) for n in class_names]
        if len(names) != 2 or len(set(names)) != 2:
            raise ValueError(f"data.class_names={names}: IMDB has 2 classes (negative, positive)")
        urls = [str(u) for u in (urls or ())]
        if source is None and not urls:
            raise ValueError("data.source is null and data.urls is empty: nothing to read")
        if source is not None and not Path(str(source)).expanduser().exists():
            raise DataError(
                f"data.source: {Path(str(source)).expanduser().resolve()}: no such file or folder "
                f"(expected {ARCHIVE_NAME} or the extracted aclImdb folder)"
            )
        # class_names: recorded (resolved) by the LightningModule under the same key
        self.save_hyperparameters(ignore=["class_names"])
        self.source = None if source is None else Path(str(source)).expanduser().resolve()
        self.urls = urls
        self.sizes = (int(train_size), int(val_size), None if test_size is None else int(test_size))
        self.shuffle_seed = int(shuffle_seed)
        self.class_names = names

    def prepare_data(self) -> None:
        """Download (or read ``data.source``) and write the book's split CSVs (locked, reused)."""
        prepare_imdb(self.source, self.data_dir, self.urls, self.sizes, self.shuffle_seed)

    def load_splits(self) -> dict[str, SplitData]:
        meta = read_meta(self.data_dir)
        if (
            meta is None
            or meta.get("settings") != imdb_settings(self.sizes, self.shuffle_seed)
            or not files_match(self.data_dir, meta)
        ):
            raise DataError(
                f"{self.data_dir}: no prepared IMDB data with these sizes (or it changed "
                f"since); call prepare_data() first (the Trainer does)"
            )
        paths = {split: self.data_dir / fname for split, fname in SPLIT_FILES.items()}
        names, splits = load_csv_splits(paths, "text", "label", ",", self.class_names)
        self.class_names = names
        return splits
