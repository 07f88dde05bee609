"""On SIGTERM, save the step training stopped at into ``last.ckpt`` (not only the last epoch)."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)


def last_checkpoint_path(trainer: L.Trainer) -> Path | None:
    """Where the every-epoch ``ModelCheckpoint`` (``filename: last``) writes, if there is one."""
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.filename == "last" and cb.dirpath:
            return Path(cb.dirpath) / f"last{cb.FILE_EXTENSION}"
    return None


class SigtermCheckpoint(L.Callback):
    """Lightning stops after the batch in progress when SIGTERM arrives; this writes that
    state (weights, optimizer, loops, the epoch's shuffling position, random generators) so
    that ``ckpt_path=last`` continues from the very step, as an uninterrupted run would."""

    saved: Path | None = None  # where the stopped step went

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or not trainer.training:
            return
        path = last_checkpoint_path(trainer)
        if path is None:  # callbacks without the last-checkpoint one: nothing to resume from
            return
        trainer.save_checkpoint(path)  # atomic (SafeCheckpointIO); all ranks take part
        self.saved = path
        log.info("SIGTERM: saved epoch %d, step %d in %s", trainer.current_epoch + 1,
                 trainer.global_step, path)
