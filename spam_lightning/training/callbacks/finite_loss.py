"""Stop at the first non-finite training loss instead of training on to `Test loss nan`."""

from __future__ import annotations

import math

import lightning as L


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the message names the epoch and step."""


class FiniteLoss(L.Callback):
    """Checks every training step's loss (one scalar already computed: no extra work)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None and not math.isfinite(value := float(loss.detach())):
            raise NonFiniteLossError(
                f"the training loss is {value} at epoch {trainer.current_epoch + 1}, step "
                f"{trainer.global_step} (batch {batch_idx} of the epoch): training stopped. Lower "
                f"optimizer.lr, use trainer.precision=32-true, or check the weights and the data; "
                f"the last good epoch is in checkpoints/last.ckpt"
            )
