"""The frozen trunk as a feature-extraction step: the hidden states after the frozen blocks,
computed once per example and served as a dataset (``TrunkFeatures``) whose batches enter the
classifier at the first trainable block.

Exact: under a causal mask position t depends only on positions <= t, so per example only what
the pooling can read (its ``span``) is stored, packed per split as ``[sum(spans), emb_dim]`` on
the CPU (without a causal mask: all of ``max_length``). ``cache.shared=true``: a split's states
are a pure function of ``split_key``, so ``SharedTrunkStore`` keeps them for later runs; each file
records a sha256 of its tensors' bytes (``tensor_digest``), checked whenever it is read.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import logging
import os
import time
from array import array
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Dataset

from spam_lightning.io_utils import (
    NO_SPACE,
    file_lock,
    remove_stale_temporaries,
    temporaries,
    write_safetensors,
)
from spam_lightning.model.pooling import Pooling, get_pooling

log = logging.getLogger(__name__)

FORMAT_VERSION = 3  # bump when the file layout or what `build` computes changes (3: sha256)
DIGEST_CHUNK = 64 * 2**20  # tensor_digest hashes chunks of this many bytes in parallel


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the sha256 of each ``DIGEST_CHUNK``-byte chunk of every tensor's bytes (name,
    dtype and shape included): hashlib releases the GIL, so the chunks hash on every core."""
    views, head = [], hashlib.sha256()
    for name, t in tensors.items():
        head.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        flat = memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        views += [flat[i : i + DIGEST_CHUNK] for i in range(0, len(flat), DIGEST_CHUNK)]
    with ThreadPoolExecutor(max_workers=max(1, min(len(views), os.cpu_count() or 1))) as pool:
        for digest in pool.map(lambda v: hashlib.sha256(v).digest(), views):
            head.update(digest)
    return head.hexdigest()


class TrunkCacheError(ValueError):
    """``cache.trunk=true`` asks for a cache that is impossible (or over the memory budget)."""


class CacheFileError(ValueError):
    """A shared cache file that is not the complete cache of its key (it is recomputed)."""


class TrunkFeatures(Dataset):
    """One split's stored states; ``collate`` zero-pads them (positions the pooling never reads)
    to the width the token batch would have (``pad_to``, else the batch's longest)."""

    def __init__(self, states: torch.Tensor, offsets: list[int], tokens, start_block: int,
                 pad_to: int | None) -> None:
        self.states, self.offsets, self.start_block, self.pad_to = states, offsets, start_block, pad_to
        self.labels, self.lengths, self.texts = tokens.labels, tokens.lengths, tokens.texts

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int, int]:
        return self.states[self.offsets[i] : self.offsets[i + 1]], self.labels[i], self.lengths[i], i

    def collate(self, items) -> dict:
        states, labels, lengths, index = zip(*items, strict=True)
        width = self.pad_to or max(lengths)
        return {"features": pad_sequence(list(states), batch_first=True)[:, :width],
                "start_block": self.start_block, "lengths": torch.tensor(lengths),
                "labels": torch.tensor(labels), "index": torch.tensor(index)}


class TrunkCache:
    """Per-split packed hidden states of ``embed`` + ``trf_blocks[:start_block]``, stored as
    ``dtype`` (float32: the residual stream stays float32 under bf16-mixed autocast)."""

    def __init__(self, start_block: int, token: str | Pooling = "last", causal: bool = True,
                 dtype: torch.dtype = torch.float32, max_batch_tokens: int = 4096) -> None:
        self.start_block, self.pooling, self.causal = start_block, get_pooling(token), causal
        self.dtype, self.max_batch_tokens = dtype, max_batch_tokens
        self._states: dict[str, torch.Tensor] = {}  # split -> [sum(stored), D]
        self._stored: dict[str, torch.Tensor] = {}  # split -> [N] stored positions per example (CPU)

    def has(self, split: str) -> bool:
        return split in self._states

    @property
    def nbytes(self) -> int:
        return sum(states.nbytes for states in self._states.values())

    def _stored_lengths(self, token_ids: list[list[int]], max_length: int) -> list[int]:
        """Per example, the positions the pooling can read at ``max_length``."""
        if not self.causal:
            return [max_length] * len(token_ids)
        return self.pooling.span(max_length, torch.tensor([len(t) for t in token_ids])).tolist()

    def features(self, split: str, dataset, pad_to: int | None) -> TrunkFeatures:
        offsets = [0, *torch.cumsum(self._stored[split], 0).tolist()]
        return TrunkFeatures(self._states[split], offsets, dataset, self.start_block, pad_to)

    def config_digest(self, model: nn.Module, device: torch.device, precision: str) -> str:
        """sha256 of everything but the data that ``build`` depends on."""
        device_type = torch.device(device).type
        device_name = f"cuda:{torch.cuda.get_device_name(device)}" if device_type == "cuda" else device_type
        fields = {"format": FORMAT_VERSION, "torch": torch.__version__, "dtype": str(self.dtype),
                  "start_block": self.start_block, "causal": self.causal, "device": device_name,
                  "max_batch_tokens": self.max_batch_tokens, "precision": str(precision),
                  "matmul": torch.get_float32_matmul_precision(),
                  "tf32": (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32),
                  "code": _code_digest(model, self.start_block)}
        h = hashlib.sha256(repr(sorted(fields.items())).encode())
        for name, tensor in frozen_tensors(model, self.start_block):
            h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
            h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        return h.hexdigest()

    def split_key(self, config_digest: str, dataset, max_length: int, pad_token_id: int) -> str:
        """``config_digest`` + the split's token ids and stored lengths (not the pooling's name)."""
        h = hashlib.sha256(f"{config_digest};max_length={max_length};pad={pad_token_id};".encode())
        token_ids = dataset.token_ids
        h.update(array("q", [len(t) for t in token_ids]).tobytes())
        h.update(array("q", self._stored_lengths(token_ids, max_length)).tobytes())
        h.update(array("q", [i for t in token_ids for i in t]).tobytes())
        return h.hexdigest()

    def save(self, split: str, path: Path, key: str) -> Path:
        """Write ``split`` to ``path`` atomically (a reader sees all or nothing), with the sha256
        of its tensors' bytes."""
        tensors = {"states": self._states[split].detach().cpu().contiguous(), "stored": self._stored[split]}
        meta = {"format": str(FORMAT_VERSION), "key": key, "start_block": str(self.start_block),
                "sha256": tensor_digest(tensors)}
        return write_safetensors(path, tensors, meta)

    def load(self, split: str, path: Path, key: str, dataset, model: nn.Module, max_length: int) -> None:
        """Memory-map ``split`` from ``path`` (pages shared by every job that reads it), or a
        ``CacheFileError`` for a file that is not the complete cache of this key."""
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:  # mmap: pages are read when used
                meta, tensors = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as err:
            raise CacheFileError(f"{path}: unreadable ({err})") from err
        if meta.get("format") != str(FORMAT_VERSION) or meta.get("key") != key:
            raise CacheFileError(f"{path}: written for another key or format ({meta})")
        expected = torch.tensor(self._stored_lengths(dataset.token_ids, max_length), dtype=torch.long)
        want = {"states": ((int(expected.sum()), model.tok_emb.weight.shape[1]), self.dtype),
                "stored": (tuple(expected.shape), torch.long)}
        found = {k: (tuple(t.shape), t.dtype) for k, t in tensors.items()}
        if found != want or not torch.equal(tensors["stored"], expected):
            raise CacheFileError(f"{path}: tensors {found} do not match this split's {want}")
        if tensor_digest(tensors) != meta.get("sha256"):  # bytes changed on disk since written
            raise CacheFileError(f"{path}: damaged (its tensors' sha256 differs from the one "
                                 "recorded when it was written)")
        self._states[split], self._stored[split] = tensors["states"], tensors["stored"]

    def estimate_bytes(self, dataset, model: nn.Module, max_length: int) -> int:
        stored = sum(self._stored_lengths(dataset.token_ids, max_length))
        return stored * model.tok_emb.weight.shape[1] * self.dtype.itemsize

    def _batches(self, stored: list[int]) -> list[list[int]]:
        """Example indices in trunk batches, shortest first (nearly no padding). A batch closes
        past ``max_batch_tokens`` padded positions or ~15% padding (sparse length ranges)."""
        batches: list[list[int]] = [[]]
        real = 0  # real (unpadded) positions in the open batch, batches[-1]
        for i in sorted(range(len(stored)), key=stored.__getitem__):
            width, current = stored[i], batches[-1]  # ascending: the new row is the widest
            padded = width * (len(current) + 1)
            if current and (padded > self.max_batch_tokens
                            or padded > 1.15 * (real + width) and width * len(current) >= 512):
                current, real = [], 0
                batches.append(current)
            current.append(i)
            real += width
        return [rows for rows in batches if rows]

    @torch.no_grad()
    def build(self, split: str, model: nn.Module, dataset, max_length: int, pad_token_id: int,
              device: torch.device) -> None:
        """Run the trunk over ``dataset``, keeping per example the states the pooling can read."""
        was_training = model.training
        model.eval()
        token_ids, stored = dataset.token_ids, self._stored_lengths(dataset.token_ids, max_length)
        offsets = [0, *torch.cumsum(torch.tensor(stored), 0).tolist()]
        states = torch.empty((offsets[-1], model.tok_emb.weight.shape[1]), dtype=self.dtype)
        for rows in self._batches(stored):
            width = max(stored[i] for i in rows)
            ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
            for r, i in enumerate(rows):
                ids[r, : min(len(token_ids[i]), width)] = torch.as_tensor(token_ids[i][:width])
            x = model.run_blocks(model.embed(ids.to(device)), start=0, end=self.start_block)
            n = torch.tensor([stored[i] for i in rows])  # positions kept per row (all for `last`)
            keep = torch.arange(width)[None, :] < n[:, None]  # [b, width], rows in order
            dest = torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in rows])
            states.index_copy_(0, dest, x[keep.to(device)].to("cpu", self.dtype))
        model.train(was_training)
        self._states[split], self._stored[split] = states, torch.tensor(stored, dtype=torch.long)


def frozen_modules(model: nn.Module, start_block: int) -> list[nn.Module]:
    """What ``build`` runs: the embeddings and ``trf_blocks[:start_block]``."""
    return [model.tok_emb, model.pos_emb, model.drop_emb, *model.trf_blocks[:start_block]]


def frozen_tensors(model: nn.Module, start_block: int) -> Iterable[tuple[str, torch.Tensor]]:
    names = ["tok_emb", "pos_emb", "drop_emb", *(f"trf_blocks.{i}" for i in range(start_block))]
    for name, module in zip(names, frozen_modules(model, start_block), strict=True):
        for sub, tensor in (*module.named_parameters(), *module.named_buffers()):
            yield f"{name}.{sub}", tensor


def is_sharded(model: nn.Module, start_block: int) -> bool:
    """Whether the frozen trunk is sharded (FSDP): a rank would hash only its shard."""
    kinds = {type(m).__name__ for f in frozen_modules(model, start_block) for m in f.modules()}
    kinds |= {type(t).__name__ for _, t in frozen_tensors(model, start_block)}
    return "DTensor" in kinds or any("FullyShardedDataParallel" in k or "FSDP" in k for k in kinds)


def _code_digest(model: nn.Module, start_block: int) -> str:
    """sha256 of the source files of every class that runs in ``build`` (and of this file)."""
    classes = {type(model)} | {type(m) for f in frozen_modules(model, start_block) for m in f.modules()}
    files: set[str] = {__file__}
    for klass in {k for cls in classes for k in cls.__mro__}:
        if not klass.__module__.startswith(("torch", "builtins")):
            try:
                files.add(inspect.getfile(klass))
            except (TypeError, OSError):
                files.add(f"{klass.__module__}.{klass.__qualname__}")
    compiled = [getattr(b, "_compiled_call_impl", None) is not None for b in model.trf_blocks[:start_block]]
    h = hashlib.sha256(repr(compiled).encode())
    for name in sorted(files):
        h.update(name.rsplit("/", 1)[-1].encode())
        try:
            h.update(Path(name).read_bytes())
        except OSError:
            h.update(name.encode())
    return h.hexdigest()


class SharedTrunkStore:
    """``<key>.safetensors`` files shared by runs and sweep jobs. The first job that needs a key
    computes it under the key's lock (others wait, then read it); after each write the least
    recently used files go until the folder is under ``max_bytes`` (never one in use)."""

    SUFFIX = ".safetensors"

    def __init__(self, directory: str | Path, max_bytes: float) -> None:
        self.directory, self.max_bytes = Path(directory), float(max_bytes)
        self.in_use: set[Path] = set()
        self.unusable = False  # read-only or full: warned once, the rest of the run does not share
        self.swept = False  # the first fetch removes what killed writers left

    def _stop_sharing(self, problem: str, split: str) -> None:
        log.warning("Frozen-trunk cache: %s; continuing without sharing (%s and the later splits "
                    "of this run are computed, not saved).", problem, split)
        self.unusable = True

    def path(self, key: str) -> Path:
        return self.directory / f"{key}{self.SUFFIX}"

    @staticmethod
    def _lock(path: Path) -> Path:
        return Path(str(path) + ".lock")

    def fetch(self, cache: TrunkCache, split: str, key: str, compute: Callable[[], None],
              load: Callable[[Path], None]) -> str:
        """``load`` the file of ``key``, or ``compute`` the split and save it: "hit" or "miss"."""
        path = self.path(key)
        if not self.swept:
            self.swept = True
            self._sweep()
        if path.is_file():
            with contextlib.suppress(CacheFileError):  # else looked at again under the lock
                return self._hit(split, path, load)
        if self.unusable:
            compute()
            return "miss"
        held = contextlib.ExitStack()
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            held.enter_context(file_lock(self._lock(path), on_wait=lambda: log.info(
                "Frozen-trunk cache: waiting for another job computing %s into %s", split, path)))
        except OSError as err:  # e.g. a read-only cache.dir: compute it for this run only
            full = err.errno in NO_SPACE
            self._stop_sharing(f"no space left in {self.directory} ({err})" if full
                               else f"cannot use {self.directory} ({err})", split)
            compute()
            return "miss"
        with held:
            if path.is_file():
                try:
                    return self._hit(split, path, load)
                except CacheFileError as err:
                    log.warning("Frozen-trunk cache: %s; removing it and recomputing %s.", err, split)
                    path.unlink(missing_ok=True)
            log.info("Frozen-trunk cache miss: computing %s (key %s...)", split, key[:12])
            t0 = time.perf_counter()
            compute()
            seconds, size = time.perf_counter() - t0, cache._states[split].nbytes
            if size > self.max_bytes:
                log.info("Frozen-trunk cache miss: computed %s in %.1f s, not saved: %.1f MiB is "
                         "over cache.max_gb=%g.", split, seconds, size / 2**20, self.max_bytes / 2**30)
                return "miss"
            try:
                cache.save(split, path, key)
            except OSError as err:  # nothing of it is left: atomic_write removed its temporary
                full = err.errno in NO_SPACE
                self._stop_sharing(f"no space left in {self.directory} to save {split} ({err})" if full
                                   else f"could not save {split} to {path} ({err})", split)
                return "miss"
            self.in_use.add(path)
            log.info("Frozen-trunk cache miss: computed %s in %.1f s, saved to %s (%.1f MiB).",
                     split, seconds, path, size / 2**20)
        self.evict()
        return "miss"

    def _hit(self, split: str, path: Path, load: Callable[[Path], None]) -> str:
        load(path)
        self.in_use.add(path)
        mib = 0.0
        with contextlib.suppress(OSError):  # evicted by another job meanwhile: this run keeps its map
            os.utime(path)  # the LRU clock: most recently used last to go
            mib = path.stat().st_size / 2**20
        log.info("Frozen-trunk cache hit: %s from %s (%.1f MiB).", split, path, mib)
        return "hit"

    def _sweep(self) -> None:
        """Remove the temporaries of killed writers (a minute old, their key's lock free)."""
        for tmp in remove_stale_temporaries(self.directory, recursive=False, min_age=60, lock_of=self._lock):
            log.info("Frozen-trunk cache: removed %s, left by an interrupted write.", tmp.name)

    def evict(self) -> None:
        """Delete stale temporaries of killed writers, then least-recently-used files until the
        folder (temporaries of writes in progress included) is under ``max_bytes``."""
        self._sweep()
        entries: list[tuple[float, int, Path]] = []
        for p in self.directory.glob(f"*{self.SUFFIX}"):
            with contextlib.suppress(OSError):
                st = p.stat()
                entries.append((st.st_mtime, st.st_size, p))
        total = sum(size for _, size, _ in entries)
        for tmp in temporaries(self.directory, recursive=False):  # being written now: they count
            with contextlib.suppress(OSError):
                total += tmp.stat().st_size
        for _, size, p in sorted(e for e in entries if e[2] not in self.in_use):  # oldest first
            if total <= self.max_bytes:
                break
            try:
                with file_lock(self._lock(p), wait=False):
                    p.unlink(missing_ok=True)  # a job reading it keeps its mapping (POSIX)
            except OSError:  # LockBusy too: being (re)written by another job
                continue
            self._lock(p).unlink(missing_ok=True)
            total -= size
            log.info("Frozen-trunk cache: evicted %s (%.1f MiB, least recently used; cache.max_gb=%g).",
                     p.name, size / 2**20, self.max_bytes / 2**30)
