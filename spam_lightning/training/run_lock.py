"""One run per run folder: a second run there would overwrite the first's files silently. A
folder that holds a run (checkpoints, results) is only ever resumed, with that run's settings."""

from __future__ import annotations

import contextlib
import copy
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, open_dict, read_write

from spam_lightning.io_utils import LockBusy, file_lock

LOCK_NAME = ".run.lock"
PID_NAME = ".run.pid"  # beside the lock: acquiring a FileLock truncates the lock file itself
_HELD: dict[Path, int] = {}  # folders this process holds: a nested run_folder_lock re-enters


class RunFolderBusy(RuntimeError):
    """Another process holds the run folder's lock."""


class RunFolderTaken(RuntimeError):
    """The run folder holds another run, and this command would not resume it."""


@contextlib.contextmanager
def run_folder_lock(folder: Path) -> Iterator[None]:
    """Hold ``folder``'s lock while a run uses it; refuse at once if another process holds it."""
    key = Path(folder).resolve()
    if key in _HELD:  # this process holds it already (the guard, then train())
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    pid_file, held = folder / PID_NAME, contextlib.ExitStack()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        held.enter_context(file_lock(folder / LOCK_NAME, wait=False))
    except LockBusy:
        holder = "unknown"
        with contextlib.suppress(OSError):
            holder = pid_file.read_text(encoding="utf-8").strip() or holder
        raise RunFolderBusy(
            f"the run folder {folder} is in use by another run (PID {holder}); wait for it to "
            f"end, or give this run its own folder (drop hydra.run.dir=, or set another one)"
        ) from None
    with held:
        pid_file.write_text(f"{os.getpid()}\n", encoding="utf-8")
        _HELD[key] = 1
        try:
            yield
        finally:
            del _HELD[key]
            pid_file.unlink(missing_ok=True)


def held_run(folder: Path) -> str | None:
    """What in ``folder`` is a run's work (results, a bundle, checkpoints), or None: Hydra's own
    files (``.hydra/``, ``train.log``) and the lock are not."""
    folder = Path(folder)
    if (folder / "metrics.json").is_file() or (folder / "bundle").is_dir():
        return "a finished run (metrics.json, bundle/)"
    if any((folder / "checkpoints").glob("*.ckpt")):
        return "a run's checkpoints (checkpoints/)"
    return None


def folder_problem(folder: Path, ckpt_path: Any) -> str | None:
    """Why a run may not use ``folder``: it holds a run and ``ckpt_path`` is not that run's own
    checkpoint (``last``, or a file inside the folder): a new run would overwrite its results,
    and Lightning would write ``last-v1.ckpt`` beside its ``last.ckpt``."""
    what = held_run(folder)
    if what is None or ckpt_path == "last":
        return None
    if ckpt_path is not None:
        with contextlib.suppress(OSError):
            if Path(folder).resolve() in Path(str(ckpt_path)).resolve().parents:
                return None
    return (f"the run folder {folder} holds {what}; a new run there would overwrite it. "
            f"Resume it with its own settings and ckpt_path=last, or drop hydra.run.dir= to "
            f"start this run in a new folder")


def _rank_zero() -> bool:
    from lightning.pytorch.utilities import rank_zero_only

    return rank_zero_only.rank == 0


class RunFolderGuard(Callback):
    """``python train.py`` (RUN mode): before Hydra writes ``.hydra/`` and ``train.log`` into the
    run folder, take its lock and refuse a folder that holds a run this command would not
    resume, or would resume with other settings. Held until the run ends (the process's exit
    releases it too); ``train()`` re-enters it. DDP's other ranks run in rank 0's folder."""

    def __init__(self) -> None:
        self._held = contextlib.ExitStack()

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not _rank_zero():
            return
        folder = Path(str(config.hydra.run.dir)).absolute()
        try:
            self._held.enter_context(run_folder_lock(folder))
            if problem := folder_problem(folder, config.get("ckpt_path")):
                raise RunFolderTaken(problem)
            if config.get("ckpt_path") is not None and held_run(folder):
                _check_resume_settings(config, folder)
        except Exception as err:
            self._held.close()
            from spam_lightning.train import KNOWN_ERRORS

            if not isinstance(err, KNOWN_ERRORS):
                raise  # a bug: Hydra warns, and train() checks again
            # Hydra turns a callback's exception into a warning and goes on: SystemExit it is,
            # before Hydra writes into the folder (train() logs the same errors to train.log)
            print(f"Error: {err}", file=sys.stderr)
            raise SystemExit(1) from err

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._held.close()


def _check_resume_settings(config: DictConfig, folder: Path) -> None:
    """The resume's settings against its checkpoint's, as ``checks.preflight`` compares them,
    before Hydra rewrites the folder's ``.hydra/config.yaml``."""
    from hydra.core.hydra_config import HydraConfig

    from spam_lightning.training import checks

    cfg = copy.deepcopy(config)
    with read_write(cfg), open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(folder)
    previous = HydraConfig.instance().cfg
    HydraConfig.instance().set_config(cfg)  # ${hydra:runtime.output_dir} as the job sees it
    try:
        checks.check_resume_settings(cfg)
    finally:
        if previous is not None:
            HydraConfig.instance().cfg = previous
