"""The file infrastructure every writer shares: one atomic write, one sweep of the temporaries a
killed writer left, one lock helper (the OS's ``flock``: a killed holder never leaves it locked)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import struct
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from filelock import FileLock
from filelock import Timeout as LockBusy  # what ``file_lock(wait=False)`` raises


class NoSpaceError(OSError):
    """A write that found its file system full (or the user's quota used up): the message names
    the folder, and the file it would have replaced is intact."""

    def __str__(self) -> str:
        return str(self.strerror)


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on ``.NAME.RANDOM.tmp`` beside ``path``, fsync it, then rename it onto
    ``path`` (same folder: the rename is atomic); on any failure the temporary goes, and a full
    disk is a ``NoSpaceError`` that names the folder."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        write(Path(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file normal permissions
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno in NO_SPACE and not isinstance(err, NoSpaceError):
            had = f"; the {path.name} already there is intact" if path.exists() else ""
            raise NoSpaceError(err.errno, f"no space left on the device of {path.parent} to write "
                               f"{path.name} ({os.strerror(err.errno)}){had}") from err
        raise
    return path


# torch dtype name -> safetensors' dtype code (its format: docs of huggingface/safetensors)
_SAFETENSORS_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
                       "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8",
                       "bool": "BOOL"}


def write_safetensors(path: str | Path, tensors: dict[str, Any], metadata: dict[str, str] | None = None) -> Path:
    """``tensors`` (CPU torch tensors) as a safetensors file, written through ``atomic_write``,
    streamed from the tensors' memory (no copy). ``safetensors.torch.save_file`` makes its own
    ``.tmpXXXXXX`` beside the target, which a killed writer leaves behind, and ``save`` copies
    every byte twice; the file is read by ``safe_open`` / ``load_file`` as theirs."""
    import torch

    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    parts, offset = [], 0
    for name, tensor in tensors.items():
        t = tensor.detach().cpu().contiguous()
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[str(t.dtype).removeprefix("torch.")],
                        "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        parts.append(t)
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(text)) + text)
            for t in parts:
                if t.numel():
                    f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))

    return atomic_write(path, write)


def write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def write_json(path: str | Path, data: Any) -> Path:
    text = json.dumps(data, indent=2, default=str) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def link_atomically(path: str | Path, source: str | Path) -> Path:
    """``path`` becomes a hard link to ``source`` (the same file, no copy), replacing what was
    there in one rename; ``OSError`` where the file system has no hard links between them."""
    return atomic_write(path, lambda tmp: (tmp.unlink(), os.link(source, tmp)))


def target_of(tmp: Path) -> Path:
    """The file an ``atomic_write`` temporary was meant to become (``.NAME.RANDOM.tmp`` -> NAME)."""
    return tmp.with_name(tmp.name[1:].rsplit(".", 2)[0])


@contextlib.contextmanager
def file_lock(path: str | Path, wait: bool = True, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold the lock file ``path``. ``wait=False``: raise ``LockBusy`` at once if another process
    holds it; else ``on_wait()`` (e.g. a log line) is called once before waiting for it."""
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except LockBusy:
        if not wait:
            raise
        if on_wait is not None:
            on_wait()
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


# what ``safetensors.torch.save_file`` (Rust's tempfile) leaves beside its target when killed
_FOREIGN_TMP = re.compile(r"\.tmp[A-Za-z0-9]{6}")


def temporaries(folder: Path, recursive: bool = True) -> list[Path]:
    """The temporaries of interrupted writes in ``folder``: ``atomic_write``'s ``.NAME.*.tmp``
    and the ``.tmpXXXXXX`` of a ``safetensors`` writer (which earlier versions used)."""
    if not folder.is_dir():
        return []
    found = (folder.rglob if recursive else folder.glob)(".tmp*")
    return [*(folder.rglob if recursive else folder.glob)(".*.tmp"),
            *(p for p in found if _FOREIGN_TMP.fullmatch(p.name) and p.is_file())]


def remove_stale_temporaries(folder: Path, recursive: bool = True, min_age: float = 0.0,
                             lock_of: Callable[[Path], Path] | None = None) -> list[Path]:
    """Delete the temporaries interrupted writes left in ``folder`` (``temporaries``; holding its
    lock), or with ``lock_of``, each whose target's lock is free (and every one older than
    ``min_age`` seconds; a ``.tmpXXXXXX`` names no target: its age alone decides)."""
    removed = []
    for tmp in temporaries(folder, recursive):
        with contextlib.suppress(OSError):
            if min_age and time.time() - tmp.stat().st_mtime < min_age:
                continue
            ours = tmp.name.endswith(".tmp")
            with file_lock(lock_of(target_of(tmp)), wait=False) if lock_of and ours else contextlib.nullcontext():
                tmp.unlink()
            removed.append(tmp)
    return removed
