"""OmegaConf resolvers the configs use; importing this module registers them.

``${cwd:}`` is the folder the command runs in. Unlike ``${hydra:runtime.cwd}`` it resolves in
every process, the multirun parent included, where Hydra computes ``hydra.sweep.dir`` before any
job (and so before ``HydraConfig`` is set) exists.

``${gpt2:NAME,KEY}`` is one size of a model from ``spam_lightning.model.sizes`` (the one place
the numbers live); ``conf/model/*.yaml`` read their sizes through it.
"""

from __future__ import annotations

import os

from omegaconf import OmegaConf

from spam_lightning.model.sizes import size

if not OmegaConf.has_resolver("cwd"):
    OmegaConf.register_new_resolver("cwd", os.getcwd)
if not OmegaConf.has_resolver("gpt2"):
    OmegaConf.register_new_resolver("gpt2", size)
