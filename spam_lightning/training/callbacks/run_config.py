"""The run's resolved config in every checkpoint, so a resume can prove it continues the same run."""

from __future__ import annotations

from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf

# Settings a resume may change: they cannot change what is trained or measured (files, logging,
# how long to go on, workers, the exact trunk cache); anything else that differs is refused.
MAY_DIFFER = (
    "ckpt_path", "paths.", "task_name", "optimized_metric", "hparams_search", "logger",
    "callbacks.progress_bar", "callbacks.learning_rate_monitor", "callbacks.test_dashboard",
    "trainer.enable_progress_bar", "trainer.enable_model_summary", "trainer.log_every_n_steps",
    "trainer.default_root_dir", "trainer.max_epochs", "trainer.max_steps", "trainer.max_time",
    "data.num_workers", "data.data_dir", "data.urls", "cache.",
)


def flat_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved job config (no ``hydra`` node) as ``{"optimizer.lr": 5e-05, ...}``: plain values
    (a checkpoint holding it loads with ``weights_only=True``)."""
    job = OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)
    flat: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(f"{prefix}{key}.", value)
        else:
            flat[prefix.removesuffix(".")] = node

    walk("", job)
    return flat


def resume_differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``key: old → new`` for every setting that differs and may not (see ``MAY_DIFFER``)."""
    old, new = ({k: c.get(k, "(unset)") for k in sorted(set(saved) | set(now))} for c in (saved, now))
    return [f"{k}: {old[k]} → {new[k]}" for k in old if old[k] != new[k] and not k.startswith(MAY_DIFFER)]


class RunConfig(L.Callback):
    """Writes ``flat_config(cfg)`` into each checkpoint (``callbacks.RunConfig.config``)."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    def state_dict(self) -> dict[str, Any]:
        return {"config": self.config}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass  # compared before training (checks.preflight), never restored
