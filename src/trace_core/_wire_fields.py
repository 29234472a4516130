"""Field checks of the wire records: the attrs validators ``trace_core.wire`` declares its
fields with, and the error they raise.

A check raises ``FieldError`` naming the field (or an item of it: ``datasets[2]``); the
converter (``trace_core._wire_convert``) turns it into ``ValidationFailed`` with the field's
path. Bounds of integer fields come from their column types, so nothing valid reaches SQL as
"integer out of range".
"""

from __future__ import annotations

import re
import uuid
from typing import Any

import attrs

#: Upper bounds of integer fields, from their column types: nothing valid reaches SQL as
#: "integer out of range".
INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1

KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:\-/]{0,199}$")
NAME_RE = re.compile(r"^[a-z][a-z0-9_.\-]{0,127}$")


class FieldError(ValueError):
    """A validator failure that knows its field."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(message)


def uuid_str(_inst: object, attribute: attrs.Attribute[Any], value: str) -> None:
    try:
        uuid.UUID(value)
    except (ValueError, AttributeError, TypeError):
        raise FieldError(attribute.name, f"{attribute.name} must be a UUID") from None


def event_key(_inst: object, attribute: attrs.Attribute[Any], value: str) -> None:
    if not KEY_RE.match(value):
        raise FieldError(attribute.name, f"{attribute.name} must match {KEY_RE.pattern}")


def lower_name(_inst: object, attribute: attrs.Attribute[Any], value: str) -> None:
    if not NAME_RE.match(value):
        raise FieldError(attribute.name, f"{attribute.name} must match {NAME_RE.pattern}")


DATASET_RE = re.compile(r"^[a-z][a-z0-9_]{0,127}$")


def dataset_name(_inst: object, attribute: attrs.Attribute[Any], value: str) -> None:
    if not DATASET_RE.match(value):
        raise FieldError(attribute.name, f"{attribute.name} must match {DATASET_RE.pattern}")


def dataset_names(_inst: object, attribute: attrs.Attribute[Any], value: list[str]) -> None:
    for i, item in enumerate(value):
        if not DATASET_RE.match(item):
            raise FieldError(
                f"{attribute.name}[{i}]", f"{attribute.name}[{i}] must match {DATASET_RE.pattern}"
            )


def hex64(_inst: object, attribute: attrs.Attribute[Any], value: str) -> None:
    if not re.fullmatch(r"[0-9a-f]{64}", value):
        raise FieldError(attribute.name, f"{attribute.name} must be 64 lowercase hex digits")


def between(lo: float, hi: float) -> Any:
    def check(_inst: object, attribute: attrs.Attribute[Any], value: float) -> None:
        if not lo <= value <= hi:
            raise FieldError(attribute.name, f"{attribute.name} must be between {lo} and {hi}")

    return check


def length(lo: int, hi: int) -> Any:
    def check(_inst: object, attribute: attrs.Attribute[Any], value: Any) -> None:
        if not lo <= len(value) <= hi:
            raise FieldError(
                attribute.name, f"{attribute.name} must have {lo} to {hi} items (has {len(value)})"
            )

    return check


__all__ = [
    "DATASET_RE",
    "INT32_MAX",
    "INT64_MAX",
    "KEY_RE",
    "NAME_RE",
    "FieldError",
    "between",
    "dataset_name",
    "dataset_names",
    "event_key",
    "hex64",
    "length",
    "lower_name",
    "uuid_str",
]
