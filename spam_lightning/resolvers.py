"""OmegaConf resolvers the configs use, registered on import. ``${cwd:}``: the folder the command
runs in (unlike ``${hydra:runtime.cwd}``, also in a multirun's parent, before ``HydraConfig`` is
set). ``${gpt2:NAME,KEY}``: one size from ``model/sizes.py``, read by ``conf/model/*.yaml``.
``${unique_dir:BASE}``: ``BASE_<random id>``, a folder this process creates (the run and sweep
folders: two commands started in the same second never share one, whatever the clock says)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from omegaconf import OmegaConf

from spam_lightning.model.sizes import size

if not OmegaConf.has_resolver("cwd"):
    OmegaConf.register_new_resolver("cwd", os.getcwd)
if not OmegaConf.has_resolver("gpt2"):
    OmegaConf.register_new_resolver("gpt2", size)


def unique_dir(base: str) -> str:
    """``base_<6 hex digits>``, created here with ``mkdir`` (which fails if it exists): no other
    process gets the same folder. Cached per process (``use_cache``), as Hydra's ``${now:}``."""
    Path(base).parent.mkdir(parents=True, exist_ok=True)
    while True:
        path = f"{base}_{secrets.token_hex(3)}"
        try:
            os.mkdir(path)
        except FileExistsError:
            continue
        return path


if not OmegaConf.has_resolver("unique_dir"):
    OmegaConf.register_new_resolver("unique_dir", unique_dir, use_cache=True)
