"""Checkpoints that are never half-written nor unpickled unsafely."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any
from weakref import proxy

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from spam_lightning.io_utils import NoSpaceError, atomic_write, link_atomically
from spam_lightning.model.weights import CheckpointError, torch_load_safely
from spam_lightning.training.callbacks.sigterm_checkpoint import last_checkpoint_path


def load_checkpoint_safely(path: str | Path, mmap: bool = False, shared: bool = True) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` of a Lightning checkpoint, or a CheckpointError that
    says why (a crafted pickle fails before any of its code runs); with ``shared``, the tensors a
    finished run's checkpoint keeps in its weights file are put back (that file checked first)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: no such file")
    checkpoint = torch_load_safely(
        path, "a plain checkpoint of tensors and containers", "Checkpoints are read only with "
        "torch.load(weights_only=True), because a pickle can run arbitrary code; resume only from "
        "checkpoints a training run wrote.", mmap=mmap, noun="checkpoint ")
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise CheckpointError(
            f"checkpoint {path} is not a Lightning training checkpoint (no 'state_dict'); pass "
            "the checkpoints/last.ckpt of a run, or use model.checkpoint= for pretrained weights"
        )
    if shared and (ref := checkpoint.pop(SHARED, None)) is not None:
        checkpoint["state_dict"].update(_shared_tensors(path, ref))
    return checkpoint


# A finished run's checkpoints keep their trained tensors once: in a safetensors file beside
# them, a hard link to the bundle's (named by content: weights-<sha256[:16]>.safetensors).
SHARED = "shared_tensors"


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _shared_tensors(path: Path, ref: dict[str, Any]) -> dict[str, Any]:
    """The tensors a checkpoint left in its weights file, after checking that file's sha256."""
    from safetensors.torch import load_file

    file = path.parent / str(ref.get("file"))
    if not file.is_file() or file_sha256(file) != ref.get("sha256"):
        problem = "is missing" if not file.is_file() else "has changed since (its sha256 differs)"
        raise CheckpointError(
            f"checkpoint {path} keeps its trained tensors in {file}, which {problem}; copy a run's "
            "checkpoints/ folder whole (its .ckpt files and weights-*.safetensors), or start a new run")
    tensors = load_file(file)
    return {key: tensors[name] for key, name in ref["keys"].items()}


def share_with_bundle(folder: Path, weights: Path) -> list[Path]:
    """After a run wrote its bundle: each checkpoint in ``folder`` whose trained tensors equal
    the bundle's keeps them as a reference to ``weights-<sha>.safetensors``, a hard link to the
    bundle's file (one copy on disk), and weights files no checkpoint names any more go.
    Checkpoints that shared an inode (the best one linked to ``last.ckpt``) still do. Returns the
    checkpoints rewritten; a file system without hard links leaves them whole."""
    from safetensors.torch import load_file

    folder, weights = Path(folder), Path(weights)
    if not folder.is_dir() or not weights.is_file():
        return []
    sha = file_sha256(weights)
    link = folder / f"weights-{sha[:16]}.safetensors"
    bundle = load_file(weights)
    groups: dict[int, list[Path]] = {}
    for ckpt in sorted(folder.glob("*.ckpt")):
        groups.setdefault(ckpt.stat().st_ino, []).append(ckpt)
    rewritten, named = [], set()
    for first, *others in groups.values():
        checkpoint = load_checkpoint_safely(first, mmap=True, shared=False)
        if SHARED in checkpoint:  # slimmed already (a finished run resumed): as it is
            named.add(checkpoint[SHARED]["file"])
            continue
        state = checkpoint["state_dict"]
        keys = {k: n for k in state for n in dict.fromkeys((k.removeprefix("model."), k))
                if n in bundle and state[k].shape == bundle[n].shape and state[k].dtype == bundle[n].dtype
                and torch.equal(state[k], bundle[n])}
        if not keys:
            continue
        if not link.exists():
            try:
                link_atomically(link, weights)
            except OSError:  # no hard links here: the checkpoints stay whole
                break
        checkpoint["state_dict"] = {k: v for k, v in state.items() if k not in keys}
        checkpoint[SHARED] = {"file": link.name, "sha256": sha, "keys": keys}
        atomic_write(first, lambda tmp, checkpoint=checkpoint: save_torch(checkpoint, tmp))
        for other in others:
            link_atomically(other, first)
        rewritten += [first, *others]
        named.add(link.name)
    for stale in folder.glob("weights-*.safetensors"):
        if stale.name not in named:
            stale.unlink()
    return rewritten


class SafeCheckpointIO(TorchCheckpointIO):
    """Checkpoint files written atomically and read safely.

    Lightning's writer fills a temporary file in the system temp folder and then moves it,
    which is a copy when that folder is another file system: a SIGKILL can leave a truncated
    ``last.ckpt`` (and a stray multi-GB temp file). Here the temporary file sits next to the
    target and is renamed onto it, so a kill leaves the previous checkpoint intact. A full disk
    stops the run with one message (``NoSpaceError``: the folder, "no space left", how to resume),
    the previous checkpoints intact. Reading is always ``weights_only=True``.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):  # remote or custom: Lightning's way
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        try:
            atomic_write(path, lambda tmp: save_torch(checkpoint, tmp))
        except NoSpaceError as err:
            raise NoSpaceError(err.errno, f"checkpoint: {err}. Free space there, then continue "
                               "this run from its last checkpoint: the same command with "
                               "hydra.run.dir=<this run's folder> ckpt_path=last") from err

    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = None) -> dict:
        if "://" in str(path):
            return super().load_checkpoint(path, weights_only=True)
        return load_checkpoint_safely(path)


def save_torch(obj: Any, path: Path) -> None:
    """``torch.save`` through a Python file: a full disk is an ``OSError`` with its errno, where
    torch's own writer (given a path) raises a RuntimeError from ``inline_container.cc``."""
    with open(path, "wb") as f:
        torch.save(obj, f)


class BestCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` whose file, when ``last.ckpt`` was written at the same step
    (the ``last_checkpoint`` callback runs first), is a hard link to it: one checkpoint write per
    epoch, not two. A later ``last.ckpt`` is a new file renamed into place, so the link keeps
    this epoch's. Elsewhere (other ranks' file systems, no hard links) it writes as Lightning does."""

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        last = last_checkpoint_path(trainer)
        fresh = [cb for cb in trainer.checkpoint_callbacks if cb is not self and cb.filename == "last"
                 and cb._last_global_step_saved == trainer.global_step]
        if trainer.world_size > 1 or last is None or not fresh or not last.is_file():
            return super()._save_checkpoint(trainer, filepath)
        try:
            link_atomically(filepath, last)
        except OSError:  # a file system without hard links
            return super()._save_checkpoint(trainer, filepath)
        self._last_global_step_saved, self._last_checkpoint_saved = trainer.global_step, filepath
        for logger in trainer.loggers:
            logger.after_save_checkpoint(proxy(self))
