"""Where the raw ``SMSSpamCollection`` comes from (``data.source``).

- ``bundled`` (the default): the copy shipped in the package (``assets/SMSSpamCollection``),
  checked against its sha256 on every read; no network.
- ``download``: ``data_dir/SMSSpamCollection`` if it is the verified file, else a verified
  download from ``data.urls`` (tried in order).
- anything else: a path to a local ``SMSSpamCollection`` file or the UCI zip holding it.

Everything written here goes to a temporary file in the target folder first and is renamed into
place only when complete and verified, so an interrupted or failed download leaves nothing
half-written behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import secrets
import urllib.request
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

DEFAULT_URLS: tuple[str, ...] = (
    "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip",
    "https://f001.backblazeb2.com/file/LLMs-from-scratch/sms%2Bspam%2Bcollection.zip",
)
MEMBER_NAME = "SMSSpamCollection"
# The UCI zip's member, byte for byte: a download is accepted only if it matches both.
EXPECTED_SIZE = 477_907
EXPECTED_SHA256 = "7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d"
DOWNLOAD_TIMEOUT = 30.0
MAX_DOWNLOAD_BYTES = 64 * 1024 * 1024
TMP_PREFIX = ".tmp-"  # every temporary file we create starts with this (stale ones get cleaned)
BUNDLED = "bundled"  # data.source keywords; any other value is a path
DOWNLOAD = "download"
SOURCE_KEYWORDS = (BUNDLED, DOWNLOAD)
BUNDLED_PATH = Path(__file__).resolve().parent / "assets" / MEMBER_NAME
FIX_HINT = (
    "Fix: use the copy bundled with the package (data.source=bundled, the default), or download "
    "the UCI 'SMS Spam Collection' zip by other means and pass "
    "data.source=/path/to/SMSSpamCollection (or data.source=/path/to/sms+spam+collection.zip)."
)


class DataError(ValueError):
    """Bad input data or source; the message names the file (and line) and the problem."""


class DownloadError(DataError):
    """No URL gave a verified ``SMSSpamCollection``; the message lists every URL tried."""


@dataclass(frozen=True)
class SourceData:
    """The raw table bytes plus what is needed to name them in errors and in ``meta.json``."""

    data: bytes
    name: str  # shown in error messages: a path, or ``zip_path!member``
    origin: dict[str, Any] = field(default_factory=dict)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def temp_path(folder: Path, stem: str) -> Iterator[Path]:
    """A temporary file path in ``folder`` (same file system, so ``os.replace`` is atomic).

    The file is removed on exit unless it was renamed away.
    """
    folder.mkdir(parents=True, exist_ok=True)
    while True:  # like mkstemp, but with the usual 0o666 & ~umask permissions (not 0o600)
        path = folder / f"{TMP_PREFIX}{stem}-{secrets.token_hex(6)}"
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            break
        except FileExistsError:
            continue
    try:
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file + fsync + ``os.replace``."""
    with temp_path(path.parent, path.name) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def clean_stale_temps(folder: Path) -> int:
    """Remove temporary files left by a killed process (call only while holding the lock)."""
    removed = 0
    if folder.is_dir():
        for p in folder.glob(f"{TMP_PREFIX}*"):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed += 1
    if removed:
        logger.info("removed %d stale temporary file(s) from %s", removed, folder)
    return removed


def _looks_like_zip(path: Path, head: bytes) -> bool:
    return path.suffix.lower() == ".zip" or head.startswith(b"PK\x03\x04")


def read_zip_member(zip_data: bytes, name: str, expected_size: int | None = None) -> bytes:
    """Return the ``SMSSpamCollection`` member of a zip (raises DataError if corrupt/missing).

    ``expected_size`` rejects a wrong member before decompressing it (no zip bombs).
    """
    try:
        with zipfile.ZipFile(io.BytesIO(zip_data)) as zf:
            members = [i for i in zf.infolist() if not i.is_dir()]
            match = [i for i in members if i.filename.rsplit("/", 1)[-1] == MEMBER_NAME]
            if not match:
                listed = ", ".join(i.filename for i in members[:10]) or "nothing"
                raise DataError(f"{name}: the zip has no {MEMBER_NAME} member (it holds {listed})")
            info = match[0]
            if expected_size is not None and info.file_size != expected_size:
                raise DataError(
                    f"{name}: {info.filename} has size {info.file_size:,} bytes, "
                    f"expected {expected_size:,}"
                )
            return zf.read(info)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as e:
        raise DataError(f"{name}: not a valid zip file (corrupt or truncated): {e}") from e


def load_local(source: str | os.PathLike[str]) -> SourceData:
    """Read a local ``SMSSpamCollection`` file or a zip holding it (no network, no verification:
    a user may deliberately pass their own edited copy; its sha256 goes into ``meta.json``)."""
    path = Path(source).expanduser().resolve()
    if not path.exists():
        raise DataError(f"data.source: {path}: no such file. {FIX_HINT}")
    if path.is_dir():
        raise DataError(
            f"data.source: {path} is a folder; pass the {MEMBER_NAME} file or the zip holding it"
        )
    data = path.read_bytes()
    if not data:
        raise DataError(f"{path}, line 1: the file is empty (0 bytes)")
    if _looks_like_zip(path, data[:4]):
        member = read_zip_member(data, str(path))
        return SourceData(member, f"{path}!{MEMBER_NAME}", {"kind": "zip", "path": str(path)})
    return SourceData(data, str(path), {"kind": "file", "path": str(path)})


def load_bundled(path: str | os.PathLike[str] = BUNDLED_PATH) -> SourceData:
    """The ``SMSSpamCollection`` shipped in the package, verified by size and sha256."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(
            f"data.source=bundled: cannot read {path} ({e.strerror or e}): the package is "
            f"incomplete; reinstall spam-lightning, or pass data.source=download or a path"
        ) from e
    actual = sha256_bytes(data)
    if len(data) != EXPECTED_SIZE or actual != EXPECTED_SHA256:
        raise DataError(
            f"data.source=bundled: {path} is damaged: {len(data):,} bytes sha256 {actual}, "
            f"expected {EXPECTED_SIZE:,} bytes sha256 {EXPECTED_SHA256}; reinstall "
            f"spam-lightning, or pass data.source=download or a path"
        )
    return SourceData(data, str(path), {"kind": BUNDLED, "path": str(path)})


def _verify(data: bytes, where: str) -> None:
    actual_sha = sha256_bytes(data)
    if len(data) != EXPECTED_SIZE or actual_sha != EXPECTED_SHA256:
        raise DataError(
            f"{where}: {MEMBER_NAME} does not match the known file: expected "
            f"{EXPECTED_SIZE:,} bytes sha256 {EXPECTED_SHA256}, got {len(data):,} bytes "
            f"sha256 {actual_sha}; not kept"
        )


def _fetch(url: str, dest: Path, timeout: float, max_bytes: int = MAX_DOWNLOAD_BYTES) -> None:
    """Stream ``url`` into ``dest``; refuse more than ``max_bytes`` and short transfers."""
    with urllib.request.urlopen(url, timeout=timeout) as resp, open(dest, "wb") as f:
        total = 0
        while chunk := resp.read(1 << 16):
            total += len(chunk)
            if total > max_bytes:
                raise DataError(f"download larger than {max_bytes:,} bytes; refused")
            f.write(chunk)
        expected = resp.headers.get("Content-Length")
        if expected is not None and expected.isdigit() and total != int(expected):
            raise DataError(f"download truncated: got {total:,} of {int(expected):,} bytes")


def download(urls: Sequence[str], dest: Path, timeout: float = DOWNLOAD_TIMEOUT) -> str:
    """Try each URL in turn; write the verified ``SMSSpamCollection`` to ``dest`` atomically.

    A URL may serve the zip or the bare file. Returns the URL that worked; raises
    DownloadError listing every URL with its failure (and the ``data.source=`` fix).
    """
    if not urls:
        raise DownloadError(f"data.source=download, but data.urls is empty. {FIX_HINT}")
    failures: list[str] = []
    for url in urls:
        try:
            logger.info("downloading %s", url)
            with temp_path(dest.parent, "download") as tmp:
                _fetch(url, tmp, timeout)
                raw = tmp.read_bytes()
            if raw.startswith(b"PK"):
                data = read_zip_member(raw, "the downloaded zip", expected_size=EXPECTED_SIZE)
            else:
                data = raw
            _verify(data, "the downloaded file")
            atomic_write_bytes(dest, data)
            logger.info("saved %s (%s bytes) from %s", dest, f"{len(data):,}", url)
            return url
        except Exception as e:  # every failure is reported below
            logger.warning("download failed: %s: %s", url, e)
            failures.append(f"  - {url}: {e if isinstance(e, DataError) else repr(e)}")
    tried = "\n".join(failures)
    raise DownloadError(
        f"could not get {MEMBER_NAME}; tried every URL in data.urls:\n{tried}\n{FIX_HINT}"
    )


def load_source(
    source: str | os.PathLike[str] | None,
    urls: Sequence[str],
    data_dir: Path,
    timeout: float = DOWNLOAD_TIMEOUT,
) -> SourceData:
    """``bundled`` (or ``None``): the packaged copy; ``download``: ``data_dir/SMSSpamCollection``
    (downloaded from ``urls`` if missing or not the verified file); else a local file or zip.
    Call while holding the preparation lock."""
    if source is None or str(source) == BUNDLED:
        return load_bundled()
    if str(source) != DOWNLOAD:
        return load_local(source)
    dest = data_dir / MEMBER_NAME
    if dest.is_file():
        data = dest.read_bytes()
        if len(data) == EXPECTED_SIZE and sha256_bytes(data) == EXPECTED_SHA256:
            return SourceData(data, str(dest), {"kind": "download", "path": str(dest)})
        logger.warning("%s is not the verified file; downloading it again", dest)
    url = download(urls, dest, timeout)
    return SourceData(dest.read_bytes(), str(dest), {"kind": "download", "url": url})
