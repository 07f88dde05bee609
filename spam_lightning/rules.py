"""The two checks every config section shares (model families, data modules, bundles), so each
wording exists once."""

from __future__ import annotations

from typing import Any


def is_int(value: Any, low: int | None = None) -> bool:
    """An int (not a bool), at least ``low`` when given: what config and bundle checks ask."""
    return isinstance(value, int) and not isinstance(value, bool) and (low is None or value >= low)


def choice_problems(option: str, value: Any, allowed: Any, fix: str = "") -> list[str]:
    """``[one line]`` when ``value`` is not one of ``allowed``, else ``[]``."""
    return [] if value in allowed else [f"{option}={value!r} is unknown; allowed: {', '.join(allowed)}{fix}"]
