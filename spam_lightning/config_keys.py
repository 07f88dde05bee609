"""Unknown config keys, refused before any work: Hydra's own hint for a key the config lacks is
``+KEY=VALUE``, which adds the key whether or not anything reads it (``+optimizer.learning_rate``
would be ignored, ``+trainer.max_epoch`` would end in the Trainer's traceback).

One rule for every node of the composed config (``hydra`` excepted):

- a node with a ``_target_`` takes its target's constructor parameters (``inspect.signature``;
  a target with ``**kwargs`` takes any key), whichever config file or override set them;
- any other node (``loss``, ``cache``, the root) takes the keys the shipped configs define for
  this run: a key that only a ``+``/``++`` override adds is refused, unless it adds a whole node
  with its own ``_target_`` (``+callbacks.probe._target_=...``: a new callback or logger).

``++model.KEY`` stays the family's rule (``checks._family``): a sweep across model families sets
GPT-2's sizes with ``++``, and a family that takes no such key names it in a warning.
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any

from omegaconf import DictConfig, ListConfig

# Hydra's instantiation keys, taken by every _target_ node
HYDRA_KEYS = frozenset({"_target_", "_partial_", "_args_", "_recursive_", "_convert_"})


def unknown_key_problems(cfg: DictConfig) -> list[str]:
    """One line per key nothing reads, with the node's known keys and the closest one."""
    overrides = _task_overrides()
    added = _added_keys(cfg, overrides) if any(o.startswith("+") for o in overrides) else set()
    family_keys = {o.split("=", 1)[0].removeprefix("++model.") for o in overrides
                   if o.startswith("++model.")}
    problems: list[str] = []
    for path, node in _nodes(cfg, ""):
        if "_target_" in node:
            known = _parameters(node._get_node("_target_")._value())
            if known is None:
                continue
            owner = f"an option of {node._get_node('_target_')._value()}"
            unknown = [k for k in node if k not in known and k not in HYDRA_KEYS
                       and not (path == "model" and k in family_keys)]
        else:
            known = [k for k in node if f"{path}.{k}".lstrip(".") not in added
                     and (path or k != "hydra")]
            owner = f"a key of {path}" if path else "a top-level key"
            unknown = [k for k in node if k not in known and not _is_target_node(node, k)
                       and (path or k != "hydra")]
        for key in unknown:
            problems.append(_problem(path, str(key), owner, [str(k) for k in known]))
    return problems


def _problem(path: str, key: str, owner: str, known: list[str]) -> str:
    def dotted(k: str) -> str:
        return f"{path}.{k}" if path else k

    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {dotted(close[0])}?)" if close else ""
    listed = ", ".join(sorted(k for k in known if k not in HYDRA_KEYS)) or "none"
    return f"{dotted(key)}: not {owner}{hint}; known keys of {path or 'the config'}: {listed}"


def _nodes(node: Any, path: str):
    """``(dotted path, node)`` for every dict node, lists' items included; not ``hydra``."""
    if isinstance(node, DictConfig):
        yield path, node
        for key in node:
            if not path and key == "hydra":
                continue
            yield from _nodes(node._get_node(key), f"{path}.{key}".lstrip("."))
    elif isinstance(node, ListConfig):
        for i in range(len(node)):
            yield from _nodes(node._get_node(i), f"{path}[{i}]")


def _parameters(target: Any) -> list[str] | None:
    """The constructor's parameter names; None: it takes any key, or it cannot be imported (the
    instantiation reports that)."""
    import hydra

    try:
        params = inspect.signature(hydra.utils.get_object(str(target))).parameters
    except Exception:
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return None
    return [name for name, p in params.items() if p.kind is not p.VAR_POSITIONAL]


def _is_target_node(node: DictConfig, key: Any) -> bool:
    child = node._get_node(key)
    return isinstance(child, DictConfig) and "_target_" in child


def _task_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def _added_keys(cfg: DictConfig, overrides: list[str]) -> set[str]:
    """Dotted keys of ``cfg`` that the same compose without the ``+``/``++`` overrides lacks."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    plain = [o for o in overrides if not o.startswith("+")]
    name = HydraConfig.get().job.config_name or "train"
    try:
        if GlobalHydra.instance().is_initialized():  # inside Hydra's app: its search path
            shipped = compose(config_name=name, overrides=plain)
        else:
            with initialize_config_module(config_module="spam_lightning.conf", version_base="1.3"):
                shipped = compose(config_name=name, overrides=plain)
    except Exception:  # e.g. a plain override of a key only a `+` adds: those keys are new
        return {o.split("=", 1)[0][1:] for o in overrides if o.startswith("+") and o[1] != "+"}
    have = {p for p, _ in _nodes(shipped, "")}
    keys = {f"{p}.{k}".lstrip(".") for p, n in _nodes(shipped, "") for k in n}
    return {f"{p}.{k}".lstrip(".") for p, n in _nodes(cfg, "") if p in have for k in n
            if p or k != "hydra"} - keys
