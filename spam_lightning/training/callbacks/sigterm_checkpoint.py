"""On SIGTERM or Ctrl-C (SIGINT), save the step training stopped at into ``last.ckpt`` (not only
the last epoch)."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerStatus
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
    that ``ckpt_path=last`` continues from the very step, as an uninterrupted run would.
    ``interrupts_like_sigterm`` makes Ctrl-C (SIGINT) take the same path."""

    saved: Path | None = None  # where the stopped step went
    signal_name = "SIGTERM"  # what stopped the run: SIGTERM, or SIGINT (Ctrl-C)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or not trainer.training:
            return
        path = last_checkpoint_path(trainer)
        if path is None:  # callbacks without the last-checkpoint one: nothing to resume from
            return
        # atomic (SafeCheckpointIO); all ranks take part; the full state, as a resume needs
        trainer.save_checkpoint(path, weights_only=False)
        self.saved = path
        log.info("%s: saved epoch %d, step %d in %s", self.signal_name, trainer.current_epoch + 1,
                 trainer.global_step, path)

    @contextlib.contextmanager
    def interrupts_like_sigterm(self, trainer: L.Trainer) -> Iterator[None]:
        """While ``trainer`` runs (fit, the final evaluation), the first Ctrl-C is a SIGTERM:
        Lightning stops after the current batch and ``on_exception`` saves it. Outside a
        Lightning loop (data preparation) it stops at once (``KeyboardInterrupt``); a second
        Ctrl-C stops at once too, without saving."""
        # signals reach the main thread only; a process started with SIGINT ignored keeps it so
        if (threading.current_thread() is not threading.main_thread()
                or signal.getsignal(signal.SIGINT) is signal.SIG_IGN):
            yield
            return

        def on_sigint(signum, frame) -> None:
            signal.signal(signal.SIGINT, signal.default_int_handler)  # the next one: at once
            self.signal_name = "SIGINT"
            connector = getattr(trainer, "_signal_connector", None)
            notify = getattr(connector, "_sigterm_notifier_fn", None)
            if trainer.state.status != TrainerStatus.RUNNING or notify is None:
                raise KeyboardInterrupt
            # this handler may interrupt a write to the very stream it logs to: then logging
            # would print its own error with the whole call stack; drop that line instead
            raise_exceptions, logging.raiseExceptions = logging.raiseExceptions, False
            try:
                log.warning("Ctrl-C: stopping after this batch and saving it (Ctrl-C again: stop "
                            "at once, unsaved)")
                notify(signum, frame)  # Lightning's SIGTERM path: the ranks stop after this batch
            finally:
                logging.raiseExceptions = raise_exceptions

        previous = signal.signal(signal.SIGINT, on_sigint)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)
