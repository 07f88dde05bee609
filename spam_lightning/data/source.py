"""Where the raw ``SMSSpamCollection`` comes from (``data.source``): ``bundled`` (sha256-checked),
``download`` (verified, from ``data.urls`` in order, written atomically) or a local file / zip."""

from __future__ import annotations

import errno
import hashlib
import io
import logging
import os
import stat
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spam_lightning.io_utils import atomic_write

logger = logging.getLogger(__name__)

DEFAULT_URLS: tuple[str, ...] = (
    "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip",
    "https://f001.backblazeb2.com/file/LLMs-from-scratch/sms%2Bspam%2Bcollection.zip",
)
MEMBER_NAME = "SMSSpamCollection"
EXPECTED_SIZE = 477_907  # the UCI zip's member, byte for byte
EXPECTED_SHA256 = "7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d"
DOWNLOAD_TIMEOUT = 30.0
MAX_DOWNLOAD_BYTES = 64 * 1024 * 1024
# a local data.source (file, zip, and the zip's member) gets the download's cap: the real file is
# 477,907 bytes, so anything this large is not it (and is never read whole into memory)
MAX_SOURCE_BYTES = MAX_DOWNLOAD_BYTES
NO_SUCH_FILE, IS_A_FOLDER = "no such file", "is a folder, not a file"
BUNDLED, DOWNLOAD = "bundled", "download"  # data.source keywords; any other value is a path
SOURCE_KEYWORDS = (BUNDLED, DOWNLOAD)
BUNDLED_PATH = Path(__file__).resolve().parent / "assets" / MEMBER_NAME
FIX_HINT = ("Fix: use the copy bundled with the package (data.source=bundled, the default), or "
            "download the UCI 'SMS Spam Collection' zip by other means and pass "
            "data.source=/path/to/SMSSpamCollection "
            "(or data.source=/path/to/sms+spam+collection.zip).")


class DataError(ValueError):
    """Bad input data or source; the message names the file (and line) and the problem."""


class DownloadError(DataError):
    """No URL gave a verified file; the message lists every URL tried."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _is_pinned(data: bytes) -> bool:
    return len(data) == EXPECTED_SIZE and sha256_bytes(data) == EXPECTED_SHA256


@dataclass(frozen=True)
class SourceData:
    """Raw bytes, the name errors use, the ``meta.json`` origin; ``verified``: the pinned file."""

    data: bytes
    name: str
    origin: dict[str, Any]
    verified: bool = False

    @property
    def sha256(self) -> str:
        return sha256_bytes(self.data)


def _limit(max_bytes: int) -> str:
    return f"{max_bytes:,}-byte limit ({max_bytes / 2**20:g} MiB)"


def read_zip_member(zip_data: bytes, name: str, expected_size: int | None = None,
                    max_bytes: int = MAX_SOURCE_BYTES) -> bytes:
    """The zip's ``SMSSpamCollection``; never more than ``max_bytes`` decompressed (by the recorded
    size and the bytes read: a header can lie)."""
    try:
        with zipfile.ZipFile(io.BytesIO(zip_data)) as zf:
            members = [i for i in zf.infolist() if not i.is_dir()]
            match = [i for i in members if i.filename.rsplit("/", 1)[-1] == MEMBER_NAME]
            if not match:
                listed = ", ".join(i.filename for i in members[:10]) or "nothing"
                raise DataError(f"{name}: the zip has no {MEMBER_NAME} member (it holds {listed})")
            info = match[0]
            if expected_size is not None and info.file_size != expected_size:
                raise DataError(f"{name}: {info.filename} has size {info.file_size:,} bytes, "
                                f"expected {expected_size:,}")
            with zf.open(info) as member:  # the recorded size first: nothing read if too big
                data = b"" if info.file_size > max_bytes else member.read(max_bytes + 1)
                if info.file_size > max_bytes or len(data) > max_bytes:
                    raise DataError(f"{name}: {info.filename} decompresses to more than the "
                                    f"{_limit(max_bytes)} for data.source (the real {MEMBER_NAME} "
                                    f"is {EXPECTED_SIZE:,} bytes); not read. {FIX_HINT}")
            return data
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as e:
        raise DataError(f"{name}: not a valid zip file (corrupt or truncated): {e}") from e


def resolve_path(source: str | os.PathLike[str]) -> Path:
    """``source`` made absolute with symlinks resolved where possible (a symlink loop or an
    unreadable folder leaves it as given, for the read to name the problem)."""
    path = Path(source).expanduser()
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop, before Python 3.13
        return path.absolute()


def os_problem(e: OSError) -> str:
    """An OS error as the words of an error message."""
    if isinstance(e, FileNotFoundError):
        return NO_SUCH_FILE
    if isinstance(e, PermissionError):
        return "permission denied (not readable by this user; check its permissions)"
    if e.errno == errno.ELOOP:
        return "a symlink loop (a link that leads back to itself); point it at a real file"
    if isinstance(e, NotADirectoryError):
        return "no such file (a part of the path is a file, not a folder)"
    if isinstance(e, IsADirectoryError):
        return IS_A_FOLDER
    return f"cannot read it: {e.strerror or e}"


def _kind_problem(mode: int) -> str | None:
    if stat.S_ISDIR(mode):
        return IS_A_FOLDER
    return None if stat.S_ISREG(mode) else ("not a regular file (a device, pipe or socket, such as "
                                            "/dev/zero); pass a file")


def path_problem(path: Path) -> str | None:
    """What keeps ``path`` from being read as a data file (None: nothing); one ``stat``, cheap."""
    try:
        st = os.stat(path)
    except OSError as e:
        return os_problem(e)
    problem = _kind_problem(st.st_mode)
    if problem is None and not os.access(path, os.R_OK):
        return os_problem(PermissionError(errno.EACCES, "Permission denied"))
    return problem


def checked_path(option: str, value: str | os.PathLike[str], missing: str = NO_SUCH_FILE,
                 folder: bool = False) -> Path:
    """``value`` resolved if a readable file (or ``folder``), else a DataError naming ``option``."""
    path = resolve_path(value)
    if (problem := path_problem(path)) is not None and not (folder and problem == IS_A_FOLDER):
        raise DataError(f"{option}: {path}: {missing if problem == NO_SUCH_FILE else problem}")
    return path


def read_local(path: Path, option: str = "data.source", max_bytes: int = MAX_SOURCE_BYTES) -> bytes:
    """A local file's bytes (at most ``max_bytes``), else a DataError naming ``option``; opened
    non-blocking, a regular file checked first (a FIFO does not hang, ``/dev/zero`` is not read)."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise DataError(f"{option}: {path}: {os_problem(e)}") from e
    try:
        with os.fdopen(fd, "rb") as f:  # closes fd
            st, limit = os.fstat(fd), f"the {_limit(max_bytes)} for {option}; not read"
            problem = _kind_problem(st.st_mode)
            if problem is None and st.st_size > max_bytes:
                problem = f"{st.st_size:,} bytes, over {limit}"
            if problem is None and len(data := f.read(max_bytes + 1)) > max_bytes:  # it grew
                problem = f"more than {limit}"
    except OSError as e:
        problem = os_problem(e)
    if problem is not None:
        raise DataError(f"{option}: {path}: {problem}")
    return data


def load_local(source: str | os.PathLike[str]) -> SourceData:
    """A local ``SMSSpamCollection`` or zip: unverified (a user may edit it), checked row by row."""
    path = resolve_path(source)
    try:
        data = read_local(path, "data.source", MAX_SOURCE_BYTES)
    except DataError as e:
        if str(e).endswith(NO_SUCH_FILE):
            raise DataError(f"{e} {FIX_HINT}") from None
        if str(e).endswith(IS_A_FOLDER):
            raise DataError(f"{e}; pass the {MEMBER_NAME} file or the zip holding it") from None
        raise
    if path.suffix.lower() == ".zip" or data.startswith(b"PK\x03\x04"):
        member = read_zip_member(data, str(path))
        return SourceData(member, f"{path}!{MEMBER_NAME}", {"kind": "zip", "path": str(path)})
    return SourceData(data, str(path), {"kind": "file", "path": str(path)})


def load_bundled(path: str | os.PathLike[str] = BUNDLED_PATH) -> SourceData:
    """The ``SMSSpamCollection`` shipped in the package, verified by size and sha256."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"data.source=bundled: cannot read {path} ({e.strerror or e}): the package "
                        f"is incomplete; reinstall spam-lightning, or pass data.source=download or "
                        f"a path") from e
    if not _is_pinned(data):
        raise DataError(f"data.source=bundled: {path} is damaged: {len(data):,} bytes sha256 "
                        f"{sha256_bytes(data)}, expected {EXPECTED_SIZE:,} bytes sha256 "
                        f"{EXPECTED_SHA256}; reinstall spam-lightning, or pass "
                        f"data.source=download or a path")
    return SourceData(data, str(path), {"kind": BUNDLED, "path": str(path)}, verified=True)


def fetch(url: str, dest: Path, timeout: float, max_bytes: int = MAX_DOWNLOAD_BYTES) -> None:
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


def download_first(urls: Sequence[str], dest: Path, keep: Callable[[Path], None], what: str,
                   hint: str, timeout: float = DOWNLOAD_TIMEOUT,
                   max_bytes: int = MAX_DOWNLOAD_BYTES) -> str:
    """The first URL whose download ``keep(tmp)`` accepts becomes ``dest``; else a DownloadError."""
    failures: list[str] = []
    for url in urls:
        try:
            logger.info("downloading %s", url)
            atomic_write(dest, lambda tmp: (fetch(url, tmp, timeout, max_bytes), keep(tmp)))  # noqa: B023
            return url
        except Exception as e:  # every failure is reported below
            logger.warning("download failed: %s: %s", url, e)
            failures.append(f"  - {url}: {e if isinstance(e, DataError) else repr(e)}")
    tried = "\n".join(failures)
    raise DownloadError(f"could not get {what}; tried every URL in data.urls:\n{tried}\n{hint}")


def download(urls: Sequence[str], dest: Path, timeout: float = DOWNLOAD_TIMEOUT) -> str:
    """A verified ``SMSSpamCollection`` (served as the zip or the bare file) to ``dest``."""
    if not urls:
        raise DownloadError(f"data.source=download, but data.urls is empty. {FIX_HINT}")

    def keep(tmp: Path) -> None:
        data = tmp.read_bytes()
        if data.startswith(b"PK"):
            data = read_zip_member(data, "the downloaded zip", expected_size=EXPECTED_SIZE)
        if not _is_pinned(data):
            raise DataError(f"the downloaded file: {MEMBER_NAME} does not match the known file: "
                            f"expected {EXPECTED_SIZE:,} bytes sha256 {EXPECTED_SHA256}, got "
                            f"{len(data):,} bytes sha256 {sha256_bytes(data)}; not kept")
        tmp.write_bytes(data)

    return download_first(urls, dest, keep, MEMBER_NAME, FIX_HINT, timeout)


def cached_download(data_dir: Path) -> SourceData | None:
    """``data_dir/SMSSpamCollection`` if it is the verified file (a finished download), else None."""
    dest = data_dir / MEMBER_NAME
    try:
        data = read_local(dest, "data.source=download", MAX_DOWNLOAD_BYTES)
    except DataError:
        return None
    origin = {"kind": DOWNLOAD, "path": str(dest)}
    return SourceData(data, str(dest), origin, verified=True) if _is_pinned(data) else None


def load_source(source: str | os.PathLike[str] | None, urls: Sequence[str], data_dir: Path,
                timeout: float = DOWNLOAD_TIMEOUT) -> SourceData:
    """``bundled``/``None``, ``download`` (reusing a verified ``data_dir/SMSSpamCollection``) or a
    local path. Call while holding the preparation lock (a download writes to ``data_dir``)."""
    if source is None or str(source) == BUNDLED:
        return load_bundled()
    if str(source) != DOWNLOAD:
        return load_local(source)
    if (cached := cached_download(data_dir)) is not None:
        return cached
    dest = data_dir / MEMBER_NAME
    if dest.is_file():
        logger.warning("%s is not the verified file; downloading it again", dest)
    origin = {"kind": DOWNLOAD, "url": download(urls, dest, timeout)}
    return SourceData(read_local(dest, "data.source=download"), str(dest), origin, verified=True)


def source_sha256(source: str | os.PathLike[str] | None) -> str:
    """The sha256 ``meta.json`` records for ``source``: the pinned one for the keywords."""
    if source is None or str(source) in SOURCE_KEYWORDS:
        return EXPECTED_SHA256
    return load_local(source).sha256
