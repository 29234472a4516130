"""Reading plain values (what a YAML or JSON loader returns) into typed ones, collecting a
``Problem`` for each value that does not fit instead of raising.

``ValueReader`` is the DAG reader's vocabulary: a mapping with string keys, allowed and
required keys, a non-empty string, a name, an integer in a range, a boolean, a choice of an
enum, a list. Each method returns the value (or ``None`` / a default) and records a problem
with the value's dotted path, a message and a hint; a path longer than ``MAX_PATH`` keeps only
its beginning, and a value is never echoed longer than ``show`` allows.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from typing import Any

from trace_core.dag._records import MAX_PATH, NAME_RE, Problem
from trace_core.dag._words import close_hint, join_path, kind_of, show


class ValueReader:
    """Plain values in, typed values out, problems collected (see the module docstring)."""

    def __init__(self) -> None:
        self.problems: list[Problem] = []
        #: Jobs that exist in the file but did not parse: references to them are not errors.
        self.broken_jobs: set[str] = set()
        #: Likewise for worker pools.
        self.broken_pools: set[str] = set()

    def problem(self, path: str, message: str, hint: str = "") -> None:
        if len(path) > MAX_PATH:  # a huge key stays in the path only as its beginning
            path = path[: MAX_PATH - 3] + "..."
        self.problems.append(Problem(path, message, hint))

    def mapping(self, value: object, path: str, what: str) -> Mapping[str, Any] | None:
        if isinstance(value, Mapping):
            bad = [k for k in value if not isinstance(k, str)]
            for k in bad:
                self.problem(
                    join_path(path, str(k)),
                    f"key {show(k)} is not a string",
                    "quote it (YAML reads yes/no/on/off/numbers as other types)",
                )
            return {k: v for k, v in value.items() if isinstance(k, str)}
        self.problem(path, f"{what} must be a mapping, not {kind_of(value)}")
        return None

    def keys(
        self,
        m: Mapping[str, Any],
        path: str,
        allowed: frozenset[str],
        required: Iterable[str] = (),
    ) -> None:
        for k in m:
            if k not in allowed:
                hint = close_hint(k, allowed) or f"allowed keys: {', '.join(sorted(allowed))}"
                self.problem(join_path(path, k), f"unknown key {show(k)}", hint)
        for k in required:
            if k not in m:
                self.problem(join_path(path, k), f"{show(k)} is required")

    def string(self, value: object, path: str) -> str | None:
        if isinstance(value, str) and value:
            return value
        self.problem(path, f"must be a non-empty string, not {kind_of(value)}")
        return None

    def name(self, value: object, path: str, what: str) -> str | None:
        text = self.string(value, path)
        if text is not None and not NAME_RE.match(text):
            self.problem(
                path,
                f"{what} {show(text)} must match {NAME_RE.pattern}",
                "lower snake_case, starting with a letter, at most 128 characters",
            )
            return None
        return text

    def integer(self, value: object, path: str, low: int, high: int) -> int | None:
        if not isinstance(value, int) or isinstance(value, bool):
            self.problem(path, f"must be an integer, not {kind_of(value)}")
            return None
        if not low <= value <= high:
            self.problem(path, f"{value} is outside {low}..{high}")
            return None
        return value

    def boolean(self, value: object, path: str) -> bool:
        if isinstance(value, bool):
            return value
        self.problem(path, f"must be true or false, not {kind_of(value)}")
        return False

    def choice(self, value: object, path: str, enum_type: type[enum.StrEnum]) -> Any:
        options = [e.value for e in enum_type]
        if isinstance(value, str) and value in options:
            return enum_type(value)
        hint = close_hint(str(value), options) if isinstance(value, str) else ""
        self.problem(path, f"must be one of {', '.join(options)}, not {show(value)}", hint)
        return None

    def array(self, value: object, path: str, what: str) -> list[Any] | None:
        if isinstance(value, list):
            return value
        self.problem(path, f"{what} must be a list, not {kind_of(value)}")
        return None


__all__ = ["ValueReader"]
