"""Small pure helpers of DAG validation: durations, hints, value shapes."""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Iterable, Mapping

_DURATION = re.compile(r"^([0-9]{1,7})(s|m|h)$")
_UNIT = {"s": 1, "m": 60, "h": 3600}


def duration_s(value: object) -> int | None:
    """Whole seconds from ``90`` or ``"90s"`` / ``"15m"`` / ``"2h"``; None if not a duration."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and (m := _DURATION.match(value.strip())):
        return int(m.group(1)) * _UNIT[m.group(2)]
    return None


def close_hint(word: str, options: Iterable[str]) -> str:
    found = difflib.get_close_matches(word, sorted(options), n=1, cutoff=0.6)
    return f"did you mean {show(found[0])}?" if found else ""


def show(value: object) -> str:
    """``repr(value)``, cut to 80 characters: a problem never echoes a huge value back."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def join_path(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def json_problem(value: object, path: str) -> tuple[str, str] | None:
    """``(path, message)`` of the first value that is not plain JSON, or None."""
    if value is None or isinstance(value, str | bool | int):
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else (path, "not a finite number")
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, str):
                return (path, f"key {show(k)} is not a string")
            if found := json_problem(v, join_path(path, k)):
                return found
        return None
    if isinstance(value, list | tuple):
        for i, v in enumerate(value):
            if found := json_problem(v, f"{path}[{i}]"):
                return found
        return None
    return (path, f"{type(value).__name__} value is not JSON (a date? quote it)")


def is_scalar(value: object) -> bool:
    return isinstance(value, str | bool | int) or (
        isinstance(value, float) and math.isfinite(value)
    )


def kind_of(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string" if value else "an empty string"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    return type(value).__name__
