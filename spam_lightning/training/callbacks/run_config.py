"""The run's resolved config in every checkpoint, so a resume can prove it continues the same run."""

from __future__ import annotations

import hashlib
from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf

from spam_lightning.data.source import DataError

# Settings a resume may change: they cannot change what is trained or measured (files, logging,
# how long to go on, workers, the exact trunk cache); anything else that differs is refused.
MAY_DIFFER = (
    "ckpt_path", "paths.", "task_name", "optimized_metric", "hparams_search", "logger",
    "callbacks.progress_bar", "callbacks.learning_rate_monitor", "callbacks.test_dashboard",
    "trainer.enable_progress_bar", "trainer.enable_model_summary", "trainer.log_every_n_steps",
    "trainer.default_root_dir", "trainer.max_epochs", "trainer.max_steps", "trainer.max_time",
    "data.num_workers", "data.data_dir", "data.urls", "cache.",
    "calibration.", "threshold.",  # fitted after training, on its final predictions
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


def _in_run_folder(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with each path under its run folder (``paths.output_dir``) written as
    ``<run folder>/...``: a run continued in another folder keeps its checkpoints there."""
    run = config.get("paths.output_dir")
    if not isinstance(run, str) or not run:
        return config
    run = run.rstrip("/")

    def relative(value: Any) -> Any:
        inside = isinstance(value, str) and (value == run or value.startswith(run + "/"))
        return "<run folder>" + value[len(run):] if inside else value

    return {key: relative(value) for key, value in config.items()}


def resume_differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``key: old → new`` for every setting that differs and may not (see ``MAY_DIFFER``); paths
    under the run folder compare relative to it."""
    saved, now = _in_run_folder(saved), _in_run_folder(now)
    old, new = ({k: c.get(k, "(unset)") for k in sorted(set(saved) | set(now))} for c in (saved, now))
    return [f"{k}: {old[k]} → {new[k]}" for k in old if old[k] != new[k] and not k.startswith(MAY_DIFFER)]


def data_digests(datamodule: Any) -> dict[str, str] | None:
    """The sha256 of each split's texts and labels as trained (whatever the source: a file, an
    archive, a CSV), or None for a data module without token datasets."""
    digests = {}
    for split in ("train", "val", "test"):
        try:
            dataset = datamodule.token_dataset(split)
        except (AttributeError, RuntimeError, ValueError):
            return None
        digest = hashlib.sha256()
        for text, label in zip(dataset.texts, dataset.labels, strict=True):
            digest.update(f"{int(label)}\t{text}\0".encode("utf-8", "surrogatepass"))
        digests[split] = digest.hexdigest()
    return digests


class DataChangedError(DataError):
    """A resume's data differs from the data its checkpoint trained on."""


class RunConfig(L.Callback):
    """Writes ``flat_config(cfg)`` and the data's digests into each checkpoint
    (``callbacks.RunConfig``); a resume on other data (the same settings, a changed file) is
    refused when the checkpoint is restored, before any training step."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.data: dict[str, str] | None = None
        self._ckpt_path: Any = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # after the data module's setup (Lightning calls it first), before a checkpoint is restored
        if stage == "fit" and trainer.datamodule is not None:
            self.data = data_digests(trainer.datamodule)
        self._ckpt_path = trainer.ckpt_path

    def state_dict(self) -> dict[str, Any]:
        return {"config": self.config, **({"data_sha256": self.data} if self.data else {})}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # the config was compared before training (checks.preflight); nothing is restored
        saved, now = state_dict.get("data_sha256"), self.data
        if not isinstance(saved, dict) or not now:  # a checkpoint from before data was recorded
            return
        changed = [f"{split}: sha256 {saved.get(split, '(none)')[:12]}… → {now[split][:12]}…"
                   for split in now if saved.get(split) != now[split]]
        if changed:
            raise DataChangedError(
                f"ckpt_path={self._ckpt_path} continues a run trained on other data: the texts or "
                "labels of a split differ from those the checkpoint trained on:\n  "
                + "\n  ".join(changed) + "\n  Resume with the data the run started with (its "
                "data.* settings and files), or start a new run in another folder.")
