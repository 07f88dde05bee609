"""Hydra entry point (``python train.py <overrides>``, ``spam-train``): config -> model family +
datamodule -> Lightning Trainer -> run folder (metrics.json, plots, bundle, checkpoints)."""

from __future__ import annotations

import contextlib
import importlib.resources
import inspect
import logging
import os
import secrets
import shlex
import sys
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from lightning.pytorch.callbacks import LearningRateMonitor, ProgressBar
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException
from omegaconf import DictConfig, OmegaConf

from spam_lightning import resolvers  # noqa: F401  (registers ${cwd:}, ${gpt2:} before Hydra composes)
from spam_lightning.calibration import config_problems
from spam_lightning.data.source import DataError
from spam_lightning.inference.bundle import BUNDLE_DIR, WEIGHTS, BundleError, add_operating_point
from spam_lightning.io_utils import NoSpaceError, remove_stale_temporaries, write_bytes, write_json
from spam_lightning.model.classifier import ClassifierStateError
from spam_lightning.model.family import FINAL_SPLITS, Fitted, ModelFamily
from spam_lightning.model.trunk_cache import TrunkCacheError
from spam_lightning.model.weights import CheckpointError, WeightsUnavailableError
from spam_lightning.quiet import quiet
from spam_lightning.run_log import echo, to_log_files
from spam_lightning.training import checks
from spam_lightning.training.callbacks import RNGState, SafeCheckpointIO
from spam_lightning.training.callbacks.calibration import Calibration
from spam_lightning.training.callbacks.checkpoint_io import share_with_bundle
from spam_lightning.training.callbacks.finite_loss import FiniteLoss, NonFiniteLossError
from spam_lightning.training.callbacks.predictions import Predictions
from spam_lightning.training.callbacks.run_config import RunConfig, flat_config
from spam_lightning.training.callbacks.sigterm_checkpoint import SigtermCheckpoint
from spam_lightning.training.checks import ConfigError, TokenizerError, instantiate
from spam_lightning.training.plots import plot_values
from spam_lightning.training.run_lock import (
    RunFolderBusy,
    RunFolderTaken,
    folder_problem,
    held_run,
    run_folder_lock,
)

log = logging.getLogger(__name__)

# conf/ ships in the package as spam_lightning.conf (wheels too): Hydra reads pkg://spam_lightning.conf
CONFIG_PATH = "pkg://spam_lightning.conf"
CONFIG_DIR = str(importlib.resources.files("spam_lightning.conf"))  # the same folder, for nested globs
SPLIT_TITLES = {"train": "Training", "val": "Validation", "test": "Test"}
# 128 + the signal, what a shell reports for a process killed by it
EXIT_STATUS = {"SIGTERM": 143, "SIGINT": 130}


# Failures whose message says what to fix: printed without a traceback (a family's errors subclass one)
KNOWN_ERRORS = (ConfigError, DataError, TokenizerError, WeightsUnavailableError, CheckpointError,
                ClassifierStateError, TrunkCacheError, BundleError, RunFolderBusy, RunFolderTaken,
                NonFiniteLossError, NoSpaceError)


class TrainingInterrupted(SystemExit):
    """SIGTERM or Ctrl-C stopped training: exit 143 or 130, where Lightning's SIGTERMException
    exits 0 (success) and its KeyboardInterrupt handling 1."""


def _interrupted(cfg: DictConfig, trainer: L.Trainer, signal_name: str) -> TrainingInterrupted:
    """Log where the run stopped and the command that continues it in its own folder."""
    overrides = HydraConfig.get().overrides.task if HydraConfig.initialized() else []
    keep = [o for o in overrides if not o.startswith(("ckpt_path=", "+ckpt_path="))]
    resume = shlex.join(["python", "train.py", *keep, f"hydra.run.dir={cfg.paths.output_dir}",
                         "ckpt_path=last"])
    saved = next((c.saved for c in trainer.callbacks if isinstance(c, SigtermCheckpoint)), None)
    last = checks.last_checkpoint(cfg, trainer.callbacks)
    where = (f"This step is saved in {saved}; the resume continues from it." if saved else
             f"The last complete epoch is saved in {last}; work after it is redone on resume." if last else
             "No checkpoint exists (no checkpoint callback); resuming starts anew.")
    log.error("%s: stopped at epoch %d, step %d. %s Resume with:\n  %s", signal_name,
              trainer.current_epoch + 1, trainer.global_step, where, resume)
    return TrainingInterrupted(EXIT_STATUS[signal_name])


quiet()  # third-party notices that are not the user's concern (spam_lightning/quiet.py)
# The data module's sampler resumes a mid-epoch checkpoint exactly (BookShuffleSampler), which
# Lightning cannot see: its warning that such a resume is unreliable does not apply here.
warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch")
# The final training accuracy is the chapter's, on the shuffled training loader (final_loaders).
warnings.filterwarnings("ignore", message="Your `test_dataloader`'s sampler has shuffling enabled")


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one training job (everything cheap checked first); returns metrics.json's metrics."""
    family, datamodule = checks.validate_config(cfg)  # cfg.model and cfg.data, instantiated
    trainer = _trainer(cfg)
    # the class count if known before reading data (SMS spam: 2); else num_classes is AttributeError
    num_classes = getattr(datamodule, "num_classes", None)
    if problems := config_problems(cfg, num_classes):  # calibration.*, threshold.max_fpr
        raise ConfigError("Invalid configuration:\n  - " + "\n  - ".join(problems))
    ckpt_path, checkpoint = checks.preflight(cfg, family, trainer.callbacks, num_classes)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    # one run per folder (rank 0 holds it; DDP's other ranks run inside rank 0's job)
    with run_folder_lock(output_dir) if rank_zero_only.rank == 0 else contextlib.nullcontext():
        problem = folder_problem(output_dir, cfg.get("ckpt_path"))
        if problem and rank_zero_only.rank == 0:  # a finished run's folder: resumed or refused
            raise RunFolderTaken(problem)
        for tmp in remove_stale_temporaries(output_dir):
            log.info("removed %s, left by an interrupted write", tmp)
        stop = next(c for c in trainer.callbacks if isinstance(c, SigtermCheckpoint))
        try:
            with stop.interrupts_like_sigterm(trainer):
                fitted = family.fit(cfg, trainer, datamodule, ckpt_path, checkpoint)
        except SIGTERMException as err:
            raise _interrupted(cfg, trainer, stop.signal_name) from err
        except KeyboardInterrupt as err:  # Ctrl-C outside a Lightning loop (data preparation)
            raise _interrupted(cfg, trainer, "SIGINT") from err
        except MisconfigurationException as err:  # e.g. limit_val_batches=0.0001: < 1 batch
            raise ConfigError(f"trainer: {err}") from err
        del checkpoint
        metrics = _metrics(cfg, family, fitted, trainer)
        if trainer.is_global_zero:
            _print_final(metrics)
            if line := _calibration(trainer).summary():
                log.info(line)
            _write_artifacts(cfg, output_dir, family, fitted, datamodule, metrics, trainer)
    return metrics


def _trainer(cfg: DictConfig) -> L.Trainer:
    """The configured loggers and callbacks, the run's own callbacks, and the Trainer."""
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c]
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
    if not loggers:  # nothing to monitor the learning rate into
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    if cfg.trainer.get("enable_progress_bar") is False:  # the flag wins over the callbacks group
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    # RNGState after ModelCheckpoint: resumes continue the same random draws; RunConfig: what a
    # resume is compared with
    callbacks += [RNGState(), FiniteLoss(), SigtermCheckpoint(), RunConfig(flat_config(cfg)),
                  Predictions(cfg.paths.output_dir),
                  Calibration(cfg.paths.output_dir, OmegaConf.select(cfg, "threshold.max_fpr"),
                              OmegaConf.select(cfg, "calibration.temperature", default=True),
                              OmegaConf.select(cfg, "calibration.bins", default=15))]
    try:
        trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    except ConfigError as err:  # Lightning's own message names the flag and what it accepts
        raise ConfigError(f"trainer: {err}") from err
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
        trainer.strategy.checkpoint_io = SafeCheckpointIO()
    return trainer


def _metrics(cfg: DictConfig, family: ModelFamily, fitted: Fitted, trainer: L.Trainer) -> dict[str, Any]:
    """metrics.json: each split's final metrics, then the run's facts and options."""
    final = fitted.final
    metrics: dict[str, Any] = {f"{s}_{n}": int(final[f"{s}_{n}"]) if n == "count" else final[f"{s}_{n}"]
                               for s in FINAL_SPLITS for n in ("accuracy", "loss", "precision", "recall", "f1", "count")}
    # each class's recall ({class name: recall}), where the family's final evaluation gives it
    metrics.update({k: final[k] for s in FINAL_SPLITS if (k := f"{s}_recall_per_class") in final})
    metrics.update(fitted.facts())
    hydra_on = HydraConfig.initialized()  # not when tests call train() directly
    experiment = HydraConfig.get().runtime.choices.get("experiment") if hydra_on else None
    metrics.update(family.recorded(cfg), seed=int(cfg.seed), experiment=experiment)
    metrics.update(_calibration(trainer).metrics or {})  # temperature, ECE, threshold, *_op
    return metrics


def _calibration(trainer: L.Trainer) -> Calibration:
    return next(c for c in trainer.callbacks if isinstance(c, Calibration))


def _print_final(metrics: dict[str, Any]) -> None:
    """The chapter's closing lines, on the terminal and in ``train.log``."""
    echo(f"Training completed in {metrics['training_seconds'] / 60:.2f} minutes.", log.name)
    for line in (*(f"{SPLIT_TITLES[s]} accuracy: {metrics[f'{s}_accuracy'] * 100:.2f}%" for s in FINAL_SPLITS),
                 *(f"{SPLIT_TITLES[s]} loss: {metrics[f'{s}_loss']:.3f}" for s in FINAL_SPLITS)):
        echo(line, log.name)


def _write_artifacts(cfg, output_dir, family, fitted, datamodule, metrics, trainer) -> None:
    """metrics.json, the resolved config, plots, the bundle and the hparams dashboard."""
    write_json(output_dir / "metrics.json", metrics)
    job_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    write_bytes(output_dir / "config.yaml", OmegaConf.to_yaml(job_cfg, resolve=True).encode())
    if fitted.history is not None:
        h, seen = fitted.history, metrics["examples_seen"]
        # the epochs run: fewer than max_epochs when early stopping ended the run
        epochs = max(1, min(int(cfg.trainer.max_epochs), int(fitted.epochs)))
        plot_values(epochs, seen, h["train_losses"], h["val_losses"], "loss", output_dir)
        plot_values(epochs, seen, h["train_accs"], h["val_accs"], "accuracy", output_dir)
        write_json(output_dir / "history.json", h)
    trained = {k: metrics[k] for k in family.trained_keys}
    bundle = family.save(output_dir, fitted.model, datamodule, cfg, trained) or output_dir / BUNDLE_DIR
    if (op := _calibration(trainer).operating_point) is not None:
        add_operating_point(Path(bundle), op)
    # the checkpoints keep the trained tensors the bundle holds as a link to its file (one copy)
    for folder in {Path(cb.dirpath) for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)}:
        share_with_bundle(folder, Path(bundle) / WEIGHTS)
    if cfg.paths.get("latest") and not _in_sweep():  # a sweep's jobs: its summary lists them
        _point_latest(Path(cfg.paths.latest), output_dir)
    _log_hparams(trainer.loggers, family.hparams(cfg, metrics), metrics, trainer.global_step)


def _in_sweep() -> bool:
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _point_latest(link: Path, run: Path) -> None:
    """``paths.latest`` (``outputs/runs/latest``) -> this run, now that its bundle is written:
    a relative symlink made beside the link, then renamed over it (atomic: readers see the old
    run or the new one, never no link)."""
    tmp = link.parent / f".{link.name}.{secrets.token_hex(4)}.tmp"
    try:
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(run.absolute(), link.parent.absolute()), tmp)
        os.replace(tmp, link)
    except OSError as err:  # e.g. a folder named like the link, or no symlinks (some Windows)
        tmp.unlink(missing_ok=True)
        log.warning("could not point %s at this run (%s)", link, err)
        return
    log.info("%s -> %s", link, run)


def _log_hparams(loggers: list[Any], hparams: dict[str, Any], metrics: dict[str, Any], step: int) -> None:
    """The final metrics beside the run's options: TensorBoard's hparams tab compares runs."""
    hparams = {k: "none" if v is None else v for k, v in hparams.items()}  # TensorBoard: no None
    final = {f"hparams/{k}": v for k, v in metrics.items() if k.endswith(("_accuracy", "_loss", "_f1"))}
    for lg in loggers:
        if "metrics" in inspect.signature(lg.log_hyperparams).parameters:  # TensorBoard's hparams tab
            lg.log_hyperparams(hparams, metrics=final)
            continue
        # CSV, W&B, MLflow logged the module's hparams at fit start (MLflow refuses changes)
        if step == 0:  # a baseline: no fit start logged them
            lg.log_hyperparams(hparams)
        lg.log_metrics(final, step=step)
        lg.save()


def expand_nested_globs(argv: list[str], config_dir: str = CONFIG_DIR) -> list[str]:
    """Expand `group=glob(...)` over sub-folders too, e.g. `experiment=glob(table/*)`: Hydra's own
    glob lists only a group's top level. Hydra's parser reads the pattern; the nested names match."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import Glob

    out = []
    parser = OverridesParser.create()
    for arg in argv:
        if "=glob(" in arg and not arg.startswith("-"):
            override = parser.parse_override(arg)
            root = Path(config_dir) / (group := override.key_or_group)
            if isinstance(override._value, Glob) and root.is_dir():
                # every config of the group, sub-folders included (`table/row01`)
                names = override._value.filter(
                    sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml")))
                if not names:
                    raise SystemExit(f"{arg}: no config in conf/{group} matches")
                arg = f"{override.get_key_element()}={','.join(names)}"
        out.append(arg)
    return out


class RunFailed(CompactHydraException):
    """A known failure: Hydra prints only this message and exits 1 (``HYDRA_FULL_ERROR=1``
    shows the cause's traceback)."""


def _log_to_files(message: str) -> None:
    """An error into the run's log files (``train.log``), not the console: Hydra prints it there."""
    to_log_files(message, logging.ERROR, log.name)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def _hydra_main(cfg: DictConfig) -> float | None:
    """Train, and return the metric an Optuna sweep optimizes."""
    try:
        metrics = train(cfg)
    except KNOWN_ERRORS as err:  # bugs (anything else) keep their traceback
        _log_to_files(f"{type(err).__name__}: {err}")
        _set_aside_failed()
        raise RunFailed(f"Error: {err}") from err
    return metrics.get(cfg.get("optimized_metric", "val_accuracy"))


FAILED_SUFFIX = "-failed"


def _set_aside_failed() -> None:
    """A run that failed before it left anything to resume or use: its folder (one Hydra named,
    not a ``hydra.run.dir`` the user chose) becomes ``<name>-failed``, so it does not look like
    a result; its ``train.log`` says why."""
    from hydra.types import RunMode

    hc = HydraConfig.get()
    if hc.mode != RunMode.RUN or rank_zero_only.rank != 0:
        return
    if any(o.lstrip("+").startswith("hydra.run.dir=") for o in hc.overrides.hydra):
        return
    folder = Path(hc.runtime.output_dir)
    if held_run(folder) is None and folder.is_dir():
        with contextlib.suppress(OSError):
            folder.rename(folder.with_name(folder.name + FAILED_SUFFIX))


def main() -> None:
    """`python train.py` / `spam-train`: Hydra's command line, with nested config globs."""
    sys.argv = [sys.argv[0], *expand_nested_globs(sys.argv[1:])]
    _hydra_main()


if __name__ == "__main__":
    main()
