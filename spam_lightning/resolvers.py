"""OmegaConf resolvers the configs use; importing this module registers them.

``${cwd:}`` is the folder the command runs in. Unlike ``${hydra:runtime.cwd}`` it resolves in
every process, the multirun parent included, where Hydra computes ``hydra.sweep.dir`` before any
job (and so before ``HydraConfig`` is set) exists.
"""

from __future__ import annotations

import os

from omegaconf import OmegaConf

if not OmegaConf.has_resolver("cwd"):
    OmegaConf.register_new_resolver("cwd", os.getcwd)
