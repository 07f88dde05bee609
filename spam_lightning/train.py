"""Hydra entry point: ``python train.py <overrides>`` or ``spam-train <overrides>``.

config -> datamodule + model -> Lightning Trainer -> run folder (metrics.json, plots, bundle,
checkpoints, TensorBoard events).
"""

from __future__ import annotations

import contextlib
import importlib.resources
import inspect
import logging
import shlex
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException, InstantiationException
from lightning.pytorch.callbacks import LearningRateMonitor, ProgressBar
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException
from omegaconf import DictConfig, OmegaConf

from spam_lightning import resolvers  # noqa: F401  (registers ${cwd:}, ${gpt2:} before Hydra composes)
from spam_lightning.data.source import DataError
from spam_lightning.inference.bundle import (
    BundleError,
    save_baseline_bundle,
    save_bundle,
    save_encoder_bundle,
)
from spam_lightning.io_utils import write_json
from spam_lightning.model.classifier import (
    ClassifierStateError,
    GPTClassifier,
    first_trainable_block,
    make_classifier,
)
from spam_lightning.model.encoder import EncoderTokenizer, EncoderUnavailableError, build_encoder
from spam_lightning.model.sizes import CFG_KEYS
from spam_lightning.model.trunk_cache import TrunkCacheError
from spam_lightning.model.weights import CheckpointError, WeightsUnavailableError, build_gpt
from spam_lightning.training import checks
from spam_lightning.training.callbacks import RNGState, SafeCheckpointIO, TrunkCaching
from spam_lightning.training.callbacks.finite_loss import FiniteLoss, NonFiniteLossError
from spam_lightning.training.callbacks.run_config import RunConfig, flat_config
from spam_lightning.training.callbacks.sigterm_checkpoint import SigtermCheckpoint
from spam_lightning.training.checks import ConfigError, TokenizerError
from spam_lightning.training.module import SpamClassifier, split_metrics
from spam_lightning.training.plots import plot_values
from spam_lightning.training.run_lock import (
    RunFolderBusy,
    remove_stale_temporaries,
    run_folder_lock,
)

log = logging.getLogger(__name__)

# conf/ ships in the package as spam_lightning.conf (wheels too): Hydra reads pkg://spam_lightning.conf
CONFIG_PATH = "pkg://spam_lightning.conf"
CONFIG_DIR = str(importlib.resources.files("spam_lightning.conf"))  # the same folder, for nested globs
FINAL_SPLITS = ("train", "val", "test")
SPLIT_TITLES = {"train": "Training", "val": "Validation", "test": "Test"}
EXIT_SIGTERM = 143  # 128 + SIGTERM, what a shell reports for a process killed by SIGTERM


# Failures with a message that says what to fix: printed without a traceback by `train.py`.
KNOWN_ERRORS = (ConfigError, DataError, TokenizerError, WeightsUnavailableError, CheckpointError,
                ClassifierStateError, TrunkCacheError, BundleError, RunFolderBusy, NonFiniteLossError,
                EncoderUnavailableError)


class TrainingInterrupted(SystemExit):
    """SIGTERM stopped training. Lightning's own SIGTERMException exits with status 0, which
    tells a scheduler or sweep the job succeeded; this one exits with 143."""


def build_model(cfg: DictConfig, num_classes: int) -> GPTClassifier:
    """GPT-2 (pretrained or random) turned into a classifier per ``trainable`` and ``token``; or,
    with ``model.kind=encoder``, the named encoder with a new head per ``trainable``."""
    m = cfg.model
    if checks.model_kind(cfg) == "encoder":
        try:  # e.g. trainable=last_block for a family without the book's mapping
            return build_encoder(m.name, num_classes=num_classes, trainable=cfg.trainable.name,
                                 weights=m.weights, seed=cfg.seed)
        except ValueError as err:
            raise ConfigError(str(err)) from err
    torch.manual_seed(cfg.seed)  # random weights are reproducible too
    sizes = {k: v for k, v in checks.model_sizes(cfg).items() if k in CFG_KEYS}
    # the config's sizes, so e.g. model.n_layers=1 builds what validate_config checked
    model = build_gpt(m.name, weights=m.weights, checkpoint=m.checkpoint,
                      causal_mask=m.causal_mask, drop_rate=m.drop_rate, **sizes)
    model = make_classifier(model, num_classes=num_classes, seed=cfg.seed, **checks.classifier_options(cfg))
    if m.get("compile", False):
        for block in model.trf_blocks:
            block.compile(dynamic=True)
    return GPTClassifier(model, token=cfg.token)


def _instantiate(node: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` that raises the target's own error (e.g. the datamodule's
    ``data.batch_size=0: must be an integer >= 1``) instead of Hydra's wrapper around it."""
    try:
        return hydra.utils.instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, (ValueError, MisconfigurationException)) and not isinstance(
            cause, KNOWN_ERRORS
        ):  # a constructor refusing a configured option, e.g. trainer.accelerator=gpu on a CPU
            raise ConfigError(str(cause)) from err
        if isinstance(cause, Exception):
            raise cause from err
        raise


def resume_command(cfg: DictConfig) -> str:
    """The command that continues this run in its own folder from its last checkpoint."""
    try:
        overrides = list(HydraConfig.get().overrides.task)
    except ValueError:  # not running under Hydra
        overrides = []
    keep = [o for o in overrides if not o.startswith(("ckpt_path=", "+ckpt_path="))]
    return shlex.join(
        ["python", "train.py", *keep, f"hydra.run.dir={cfg.paths.output_dir}", "ckpt_path=last"]
    )


def _interrupted(cfg: DictConfig, callbacks: list[Any], trainer: L.Trainer) -> TrainingInterrupted:
    saved = next((c.saved for c in trainer.callbacks if isinstance(c, SigtermCheckpoint)), None)
    last = checks.last_checkpoint(cfg, callbacks)
    if saved is not None:
        where = f"This step is saved in {saved}; the resume continues from it."
    elif last is not None:
        where = f"The last complete epoch is saved in {last}; work after it is redone on resume."
    else:
        where = "No checkpoint exists (no checkpoint callback); resuming starts anew."
    log.error(
        "SIGTERM: stopped at epoch %d, step %d. %s Resume with:\n  %s",
        trainer.current_epoch + 1, trainer.global_step, where, resume_command(cfg),
    )
    return TrainingInterrupted(EXIT_SIGTERM)


# The data module's sampler resumes a mid-epoch checkpoint exactly (BookShuffleSampler), which
# Lightning cannot see: its warning that such a resume is unreliable does not apply here.
warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch")
# The final training accuracy is the chapter's, on the shuffled training loader (final_loaders).
warnings.filterwarnings("ignore", message="Your `test_dataloader`'s sampler has shuffling enabled")


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one training job; returns the metrics written to ``metrics.json``.

    Everything that can be checked cheaply (config, datamodule options, trainer flags,
    checkpoints) is checked before the data is prepared or the model is built.
    """
    checks.validate_config(cfg)
    datamodule = _instantiate(cfg.data)  # validates its own options; reads nothing yet
    loggers = [_instantiate(c) for c in (cfg.get("logger") or {}).values() if c]
    if checks.model_kind(cfg) == "baseline":
        return _train_baseline(cfg, datamodule, loggers)
    callbacks = [_instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
    if not loggers:  # nothing to monitor the learning rate into
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    if cfg.trainer.get("enable_progress_bar") is False:  # the flag wins over the callbacks group
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    callbacks.append(RNGState())  # after ModelCheckpoint: resumes continue the same random draws
    callbacks.append(FiniteLoss())
    callbacks.append(SigtermCheckpoint())
    callbacks.append(RunConfig(flat_config(cfg)))  # what a resume is compared with
    trainer: L.Trainer = _instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
        trainer.strategy.checkpoint_io = SafeCheckpointIO()
    ckpt_path, checkpoint = checks.preflight(cfg, callbacks, checks.known_num_classes(datamodule))

    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    # one run per folder (rank 0 holds it; DDP's other ranks run inside rank 0's job)
    lock = run_folder_lock(output_dir) if rank_zero_only.rank == 0 else contextlib.nullcontext()
    with lock:
        for tmp in remove_stale_temporaries(output_dir):
            log.info("removed %s, left by an interrupted write", tmp)
        return _fit(cfg, trainer, datamodule, callbacks, ckpt_path, checkpoint, output_dir)


def _fit(cfg, trainer, datamodule, callbacks, ckpt_path, checkpoint, output_dir) -> dict[str, Any]:
    """Data, model, fit, final evaluation and artifacts, with the run folder locked."""
    L.seed_everything(cfg.seed, workers=True)
    encoder = checks.model_kind(cfg) == "encoder"
    if encoder:  # its own tokenizer, special tokens and pad token
        try:
            datamodule.use_tokenizer(EncoderTokenizer(cfg.model.name))
        except ValueError as err:  # a tokenizer without a pad token
            raise ConfigError(f"model.name={cfg.model.name}: {err}") from err
    datamodule.prepare_data()
    datamodule.setup("fit")

    model = build_model(cfg, datamodule.num_classes)
    module = SpamClassifier(
        model, num_classes=datamodule.num_classes, trainable=cfg.trainable.name,
        lr=cfg.optimizer.lr, weight_decay=cfg.optimizer.weight_decay,
        ignore_index=cfg.loss.ignore_index, class_names=list(datamodule.class_names),
        final_splits=FINAL_SPLITS,
    )
    caching = None if encoder else TrunkCaching(
        first_trainable_block(cfg.trainable.name, len(model.trf_blocks)), datamodule, **cfg.cache
    )
    if caching is not None:
        trainer.callbacks.append(caching)
    if checkpoint is not None:  # the head too, now that the data named the classes
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        checks.check_resume_checkpoint(cfg, ckpt_path, checkpoint, expected)
        del checkpoint

    # The chapter seeds once more right before its optimizer and loop; from here on only its own
    # loaders draw from the global RNG (a resume restores the saved state instead: RNGState).
    torch.manual_seed(cfg.seed)
    start = time.perf_counter()
    try:
        # weights_only: a checkpoint is data, never code (SafeCheckpointIO enforces it as well)
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        wall = time.perf_counter() - start
        datamodule.setup("test")
        trainer.test(module, dataloaders=final_loaders(datamodule, trainer), verbose=False)
    except SIGTERMException as err:
        raise _interrupted(cfg, callbacks, trainer) from err
    final = module.test_results.metrics
    monitor = next((c for c in trainer.callbacks if hasattr(c, "history")), None)
    training_seconds = monitor.training_seconds if monitor else wall
    cached = caching.seconds if caching is not None else {}
    cache_seconds = sum(v for k, v in cached.items() if k in ("train", "val"))
    log.info(
        "Training took %.1f s: frozen-trunk cache %.1f s (%s), epochs and evaluations %.1f s.",
        training_seconds, cache_seconds, ", ".join(f"{k} {v:.1f} s" for k, v in cached.items()
                                                    if k in ("train", "val")) or "none",
        training_seconds - cache_seconds,
    )

    metrics: dict[str, Any] = {
        f"{split}_{name}": int(final[f"{split}_{name}"]) if name == "count" else final[f"{split}_{name}"]
        for split in FINAL_SPLITS
        for name in ("accuracy", "loss", "precision", "recall", "f1", "count")
    }
    metrics.update(
        examples_seen=monitor.examples_seen if monitor else None,
        training_seconds=round(training_seconds, 3),
        max_length=int(datamodule.max_length),
        num_batches={s: len(getattr(datamodule, f"{s}_dataloader")()) for s in FINAL_SPLITS},
        model=cfg.model.name, weights=cfg.model.weights, trainable=cfg.trainable.name,
        token=None if encoder else cfg.token.name, padding=cfg.data.padding, seed=int(cfg.seed),
        epochs=int(trainer.current_epoch), global_step=int(trainer.global_step),
        precision=str(trainer.precision), device=_device_name(trainer),
        trunk_cache=caching is not None and caching.active, experiment=_experiment_name(cfg),
    )
    bundled = _bundle_model(cfg, trainer, module, datamodule.num_classes)  # every rank: FSDP
    if trainer.is_global_zero:
        _print_final(metrics)
        _write_artifacts(cfg, output_dir, bundled, datamodule, monitor, metrics, trainer)
    return metrics


def _bundle_model(cfg: DictConfig, trainer: L.Trainer, module: SpamClassifier, num_classes: int):
    """The trained classifier, unsharded, for the bundle (rank 0; None elsewhere).

    Under FSDP the weights are sharded and ``state_dict()`` is a collective call: every rank
    gathers (Lightning's full state dict, which lands on rank 0), and rank 0 loads the full
    tensors into a copy built on the meta device (no memory until the tensors are assigned).
    """
    if not isinstance(trainer.strategy, FSDPStrategy):
        return module.model if trainer.is_global_zero else None
    full = trainer.strategy.lightning_module_state_dict()
    if not trainer.is_global_zero:
        return None
    return unsharded_copy(cfg, {k.removeprefix("model."): v for k, v in full.items()}, num_classes)


def unsharded_copy(cfg: DictConfig, state: dict[str, torch.Tensor], num_classes: int) -> GPTClassifier:
    """``build_model(cfg)`` on the meta device, then ``state`` assigned into it."""
    plain_cfg = OmegaConf.merge(cfg, {"model": {"weights": "random", "checkpoint": None, "compile": False}})
    with torch.device("meta"):
        model = build_model(plain_cfg, num_classes)
    model.load_state_dict(state, assign=True)
    return model


def final_loaders(datamodule: Any, trainer: L.Trainer) -> list[Any]:
    """The final evaluation's train, val and test loaders. One process: the chapter's own
    (``calc_accuracy_loader(train_loader, ...)``: the shuffled training loader, drop_last, from
    the global RNG), so the final training accuracy is the book's. Under DDP, whose order differs
    anyway: every example once, in order."""
    book = getattr(datamodule, "book_dataloader", None)
    if trainer.world_size == 1 and book is not None:
        return [book(s) for s in FINAL_SPLITS]
    return [datamodule.eval_dataloader(s) for s in FINAL_SPLITS]


def _experiment_name(cfg: DictConfig) -> str | None:
    try:
        return HydraConfig.get().runtime.choices.get("experiment")
    except ValueError:  # not running under Hydra (tests calling train() directly)
        return None


def _device_name(trainer: L.Trainer) -> str:
    device = trainer.strategy.root_device
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} x{trainer.world_size}" if trainer.world_size > 1 else device.type


def _print_final(metrics: dict[str, Any]) -> None:
    print(f"Training completed in {metrics['training_seconds'] / 60:.2f} minutes.")
    for split in FINAL_SPLITS:
        print(f"{SPLIT_TITLES[split]} accuracy: {metrics[f'{split}_accuracy'] * 100:.2f}%")
    for split in FINAL_SPLITS:
        print(f"{SPLIT_TITLES[split]} loss: {metrics[f'{split}_loss']:.3f}")


def _write_artifacts(cfg, output_dir, model, datamodule, monitor, metrics, trainer) -> None:
    """metrics.json, the resolved config, plots, the bundle and the hparams dashboard."""
    _write_results(cfg, output_dir, metrics)
    if monitor is not None and monitor.history["train_losses"]:
        h = monitor.history
        epochs = max(1, int(cfg.trainer.max_epochs))
        plot_values(epochs, monitor.examples_seen, h["train_losses"], h["val_losses"], "loss", output_dir)
        plot_values(epochs, monitor.examples_seen, h["train_accs"], h["val_accs"], "accuracy", output_dir)
        write_json(output_dir / "history.json", h)
    trained = {"trained": {k: metrics[k] for k in ("model", "weights", "trainable", "seed")}}
    if checks.model_kind(cfg) == "encoder":
        save_encoder_bundle(
            output_dir, model, datamodule.tokenizer, class_names=list(datamodule.class_names),
            max_length=datamodule.max_length, padding=cfg.data.padding, extra=trained,
        )
    else:
        save_bundle(
            output_dir, model, class_names=list(datamodule.class_names), token=cfg.token.name,
            max_length=datamodule.max_length, padding=cfg.data.padding,
            pad_token_id=datamodule.pad_token_id, extra=trained,
        )
    hparams = {
        "model": cfg.model.name, "weights": cfg.model.weights, "trainable": cfg.trainable.name,
        "token": metrics["token"], "padding": cfg.data.padding, "max_length": metrics["max_length"],
        "lr": cfg.optimizer.lr, "weight_decay": cfg.optimizer.weight_decay,
        "batch_size": cfg.data.batch_size, "seed": cfg.seed, "precision": metrics["precision"],
    }
    _log_hparams(trainer.loggers, hparams, metrics, trainer.global_step)


def _write_results(cfg: DictConfig, output_dir: Path, metrics: dict[str, Any]) -> None:
    write_json(output_dir / "metrics.json", metrics)
    job_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(job_cfg, resolve=True), encoding="utf-8")


def _log_hparams(loggers: list[Any], hparams: dict[str, Any], metrics: dict[str, Any], step: int) -> None:
    """The final metrics beside the run's options: TensorBoard's hparams tab compares runs."""
    hparams = {k: "none" if v is None else v for k, v in hparams.items()}  # TensorBoard: no None
    final = {f"hparams/{k}": v for k, v in metrics.items() if k.endswith(("_accuracy", "_loss", "_f1"))}
    for lg in loggers:
        if "metrics" in inspect.signature(lg.log_hyperparams).parameters:  # TensorBoard's hparams tab
            lg.log_hyperparams(hparams, metrics=final)
        else:  # CSV, W&B, MLflow logged the module's hparams at fit start (MLflow refuses changes)
            if step == 0:  # a baseline: no fit start logged them
                lg.log_hyperparams(hparams)
            lg.log_metrics(final, step=step)
        lg.save()


def _train_baseline(cfg: DictConfig, datamodule: Any, loggers: list[Any]) -> dict[str, Any]:
    """Majority class or logistic regression (scikit-learn) on the same data, split and
    artifacts as the trained models: metrics.json, bundle, hparams. No Lightning loop: it
    fits in one call."""
    from spam_lightning.model.baselines import fit_baseline

    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with run_folder_lock(output_dir):
        datamodule.prepare_data()
        datamodule.setup("fit")
        splits = {s: getattr(datamodule, f"{s}_dataset") for s in FINAL_SPLITS}
        num_classes = datamodule.num_classes
        start = time.perf_counter()
        baseline = fit_baseline(
            cfg.model.name, splits["train"].texts, splits["train"].labels, num_classes,
            features=cfg.model.features, max_iter=cfg.model.max_iter, seed=cfg.seed,
        )
        seconds = time.perf_counter() - start
        metrics: dict[str, Any] = {}
        for split, ds in splits.items():
            probs = torch.from_numpy(baseline.predict_proba(ds.texts))
            for name, value in split_metrics(probs, torch.tensor(ds.labels), num_classes).items():
                metrics[f"{split}_{name}"] = int(value) if name == "count" else value
        metrics.update(
            examples_seen=len(splits["train"]), training_seconds=round(seconds, 3), max_length=None,
            num_batches=None, model=cfg.model.name, weights=None, trainable=None, token=None,
            padding=None, seed=int(cfg.seed), epochs=1, global_step=0, precision="64",
            device="cpu", trunk_cache=False, experiment=_experiment_name(cfg),
            features=cfg.model.features,
        )
        _print_final(metrics)
        _write_results(cfg, output_dir, metrics)
        save_baseline_bundle(
            output_dir, baseline, class_names=list(datamodule.class_names),
            extra={"trained": {k: metrics[k] for k in ("model", "seed", "features")}},
        )
        hparams = {"model": cfg.model.name, "features": cfg.model.features,
                   "max_iter": cfg.model.max_iter, "seed": cfg.seed}
        _log_hparams(loggers, hparams, metrics, 0)
    return metrics


def nested_options(group: str, config_dir: str = CONFIG_DIR) -> list[str]:
    """Every config of a group, sub-folders included (`table/row01`), as `group=` accepts them."""
    root = Path(config_dir) / group
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))


def expand_nested_globs(argv: list[str], config_dir: str = CONFIG_DIR) -> list[str]:
    """Expand `group=glob(...)` over sub-folders too, e.g. `experiment=glob(table/*)`.

    Hydra's own glob lists only the top level of a config group; the pattern is parsed by
    Hydra's override parser and matched against the nested names, then handed back as a list.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import Glob

    out = []
    parser = OverridesParser.create()
    for arg in argv:
        if "=glob(" in arg and not arg.startswith("-"):
            override = parser.parse_override(arg)
            group = override.key_or_group
            if isinstance(override._value, Glob) and (Path(config_dir) / group).is_dir():
                names = override._value.filter(nested_options(group, config_dir))
                if not names:
                    raise SystemExit(f"{arg}: no config in conf/{group} matches")
                arg = f"{override.get_key_element()}={','.join(names)}"
        out.append(arg)
    return out


class RunFailed(CompactHydraException):
    """A known failure (bad config, data, tokenizer, weights, checkpoint): Hydra prints only
    this message, without a traceback, and exits with status 1 (``HYDRA_FULL_ERROR=1`` shows the
    traceback of the original error, chained as ``__cause__``)."""


def _log_to_files(message: str) -> None:
    """Write an error into the run's log files (Hydra's ``train.log``) but not to the console,
    where Hydra prints the same message once when the job exits."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, None, None)
    for logger in (log, logging.getLogger()):
        for handler in logger.handlers:
            if isinstance(handler, logging.FileHandler) and record.levelno >= handler.level:
                handler.handle(record)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def _hydra_main(cfg: DictConfig) -> float | None:
    """Train, and return the metric an Optuna sweep optimizes."""
    try:
        metrics = train(cfg)
    except KNOWN_ERRORS as err:  # bugs (anything else) keep their traceback
        _log_to_files(f"{type(err).__name__}: {err}")
        raise RunFailed(f"Error: {err}") from err
    return metrics.get(cfg.get("optimized_metric", "val_accuracy"))


def main() -> None:
    """`python train.py` / `spam-train`: Hydra's command line, with nested config globs."""
    sys.argv = [sys.argv[0], *expand_nested_globs(sys.argv[1:])]
    _hydra_main()


if __name__ == "__main__":
    main()
