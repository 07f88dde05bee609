"""OmegaConf resolvers the configs use, registered on import. ``${cwd:}``: the folder the command
runs in (unlike ``${hydra:runtime.cwd}``, also in a multirun's parent, before ``HydraConfig`` is
set). ``${gpt2:NAME,KEY}``: one size from ``model/sizes.py``, read by ``conf/model/*.yaml``."""

from __future__ import annotations

import os

from omegaconf import OmegaConf

from spam_lightning.model.sizes import size

if not OmegaConf.has_resolver("cwd"):
    OmegaConf.register_new_resolver("cwd", os.getcwd)
if not OmegaConf.has_resolver("gpt2"):
    OmegaConf.register_new_resolver("gpt2", size)
