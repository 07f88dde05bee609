"""Checkpoints that are never half-written nor unpickled unsafely."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from spam_lightning.io_utils import atomic_write
from spam_lightning.model.weights import CheckpointError, torch_load_safely


def load_checkpoint_safely(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` of a Lightning checkpoint, or a CheckpointError that
    says why (a crafted pickle fails before any of its code runs)."""
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
    return checkpoint


class SafeCheckpointIO(TorchCheckpointIO):
    """Checkpoint files written atomically and read safely.

    Lightning's writer fills a temporary file in the system temp folder and then moves it,
    which is a copy when that folder is another file system: a SIGKILL can leave a truncated
    ``last.ckpt`` (and a stray multi-GB temp file). Here the temporary file sits next to the
    target and is renamed onto it, so a kill leaves the previous checkpoint intact. Reading is
    always ``weights_only=True``.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):  # remote or custom: Lightning's way
            super().save_checkpoint(checkpoint, path, storage_options)
        else:
            atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))

    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = None) -> dict:
        if "://" in str(path):
            return super().load_checkpoint(path, weights_only=True)
        return load_checkpoint_safely(path)
