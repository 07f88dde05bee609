"""Compose the real `conf/train.yaml` in-process, with run paths inside a test folder."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

import spam_lightning.resolvers  # noqa: F401  (${cwd:})

# the package's configs, found as `spam-train` finds them (pkg://spam_lightning.conf)
CONF_MODULE = "spam_lightning.conf"
CONF = Path(__file__).resolve().parents[1] / "conf"


def compose_train(overrides: list[str], work: Path | None = None, config_name: str = "train") -> DictConfig:
    """The composed config (with its `hydra` node); paths point into ``work`` when given."""
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module=CONF_MODULE, version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    if work is not None:
        with open_dict(cfg):
            cfg.paths.root_dir = str(work)
            cfg.paths.output_dir = str(work / "run")
            if not any(o.startswith("paths.data_dir=") for o in overrides):
                cfg.paths.data_dir = str(work / "data")
    return cfg
