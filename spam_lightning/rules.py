"""The two checks every config section shares (model families, data modules, bundles), so each
wording exists once."""

from __future__ import annotations

from typing import Any


def is_int(value: Any, low: int | None = None) -> bool:
    """An int (not a bool), at least ``low`` when given: what config and bundle checks ask."""
    return isinstance(value, int) and not isinstance(value, bool) and (low is None or value >= low)


# numpy's (and so Lightning's seed_everything's and pandas' random_state's) largest seed
MAX_SEED = 2**32 - 1
SEED_RANGE = f"an integer in [0, {MAX_SEED}] (numpy's seed range)"


def is_seed(value: Any) -> bool:
    """A seed numpy accepts: an int in ``[0, 2**32 - 1]``."""
    return is_int(value, 0) and value <= MAX_SEED


def bool_problems(**options: Any) -> list[str]:
    """``OPTION=value: must be true or false`` for each option (dotted name) that is no bool;
    a string such as ``maybe`` would otherwise count as true."""
    return [f"{k}={v!r}: must be true or false" for k, v in options.items()
            if not isinstance(v, bool)]


def choice_problems(option: str, value: Any, allowed: Any, fix: str = "") -> list[str]:
    """``[one line]`` when ``value`` is not one of ``allowed``, else ``[]``."""
    return [] if value in allowed else [f"{option}={value!r} is unknown; allowed: {', '.join(allowed)}{fix}"]
