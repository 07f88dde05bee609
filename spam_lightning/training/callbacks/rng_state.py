"""Random generators in the checkpoint, so a resumed run draws what an uninterrupted one would."""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch


class RNGState(L.Callback):
    """Saves and restores the global generators (torch, CUDA, numpy, ``random``); Lightning does
    not. Resuming a finished run trains nothing, yet Lightning draws a DataLoader seed: undone."""

    _at_fit_start: torch.Tensor | None = None
    _trained = False

    def on_fit_start(self, trainer, pl_module) -> None:
        self._at_fit_start, self._trained = torch.get_rng_state(), False

    def on_train_start(self, trainer, pl_module) -> None:
        self._trained = True

    def on_fit_end(self, trainer, pl_module) -> None:
        if not self._trained and self._at_fit_start is not None:
            torch.set_rng_state(self._at_fit_start)

    def state_dict(self) -> dict[str, Any]:
        name, keys, pos, has_gauss, gauss = np.random.get_state()
        state: dict[str, Any] = {  # plain tensors and numbers: loadable with weights_only=True
            "torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)),
                      "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)},
        }
        if torch.cuda.is_initialized():  # this process's device only: no context on the others
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        torch.set_rng_state(state_dict["torch"])
        random.setstate(state_dict["python"])
        n = state_dict["numpy"]
        np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
        if isinstance(cuda := state_dict.get("cuda"), torch.Tensor) and torch.cuda.is_available():
            torch.cuda.set_rng_state(cuda)
