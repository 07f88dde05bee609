"""DDP inside Hydra multiruns: Lightning's ranks 1..N-1 re-run ``sys.argv`` (the whole sweep), and
a job's process group outlives it (Lightning-AI/pytorch-lightning#11300): ``HydraDDPCallback``
makes the ranks re-run this job only, and ends the group and its rank variables after it."""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

log = logging.getLogger(__name__)

# what Lightning's subprocess launcher exports for the ranks of one job
DDP_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")
_LAUNCHER_MODULES = (
    "lightning.pytorch.strategies.launchers.subprocess_script",
    "lightning.fabric.strategies.launchers.subprocess_script",
)


def job_command(local_rank: int) -> tuple[list[str], str]:
    """The command that re-runs the current Hydra job (not its sweep) as DDP rank ``local_rank``
    (Lightning's ``_hydra_subprocess_cmd``, which RUN mode uses as it is)."""
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        from lightning.fabric.strategies.launchers.subprocess_script import _hydra_subprocess_cmd

        command, cwd = _hydra_subprocess_cmd(local_rank=local_rank)
        return list(command), cwd
    command = [sys.executable, "-m", "spam_lightning.train", f"--config-name={hc.job.config_name}"]
    for source in hc.runtime.config_sources:
        if source.provider == "command-line" and source.schema == "file":
            command.append(f"--config-dir={source.path}")
    # hydra.output_subdir: the parent job already wrote .hydra/; hydra.mode: e.g. hparams_search=optuna
    # sets MULTIRUN in the config; the run dir quoted: one string whatever the path holds
    run_dir = "'" + hc.runtime.output_dir.replace("'", "\\'") + "'"
    command += [*hc.overrides.task, f"hydra.run.dir={run_dir}",
                f"hydra.job.name=train_ddp_process_{local_rank}", "hydra.output_subdir=null", "hydra.mode=RUN"]
    return command, hc.runtime.cwd


def install_job_command() -> bool:
    """Point Lightning's subprocess launcher at ``job_command`` (False if Lightning changed)."""
    installed = False
    for name in _LAUNCHER_MODULES:
        with contextlib.suppress(ImportError):
            if hasattr(module := importlib.import_module(name), "_hydra_subprocess_cmd"):
                module._hydra_subprocess_cmd = job_command
                installed = True
    return installed


class HydraDDPCallback(Callback):
    """Per job: DDP children re-run this job only; afterwards its process group is torn down."""

    _env: dict[str, str | None] = {}  # replaced per job

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._env = {name: os.environ.get(name) for name in DDP_ENV}
        if HydraConfig.get().mode == RunMode.MULTIRUN and not install_job_command():
            log.warning("could not adapt Lightning's DDP launcher to Hydra multiruns (Lightning "
                        "changed?); trainer=ddp inside a sweep may start the whole sweep in every "
                        "rank")

    def on_job_end(self, config: DictConfig, job_return: Any = None, **kwargs: Any) -> None:
        torch = sys.modules.get("torch")
        if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        # Lightning's launcher exported these for this job's ranks; left set, the next job in
        # this process would believe an outside launcher started it and wait for ranks forever
        os.environ.update({name: value for name, value in self._env.items() if value is not None})
        for name in (name for name, value in self._env.items() if value is None):
            os.environ.pop(name, None)
