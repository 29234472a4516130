"""The one converter of the wire records and the strict (de)serialization around it.

``structure`` builds a record from decoded JSON strictly: unknown fields, wrong JSON types (no
``"1"`` for an int, no ``true`` for an int) and values a field check refuses become one
``ValidationFailed`` naming the field path of the first problem (``events[0].key``), with the
first 20 problems in its details; the text of an unexpected exception is never echoed.
``unstructure`` is the JSON-ready form, ``canonical_digest`` its hash. Records are declared in
``trace_core.wire``, which re-exports these names.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any, TypeVar

import attrs
import cattrs
import cattrs.v
from cattrs.cols import list_structure_factory
from cattrs.gen import make_dict_structure_fn

from trace_core import errors
from trace_core._wire_fields import FieldError

T = TypeVar("T")


def _strict(tp: type[Any]) -> Any:
    def hook(value: Any, _t: Any) -> Any:
        if tp is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if type(value) is not tp:
            raise TypeError(f"expected {tp.__name__}, got {type(value).__name__}")
        return value

    return hook


def _strict_dict(value: Any, _t: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TypeError(f"expected object, got {type(value).__name__}")
    return value


def _strict_list_factory(t: Any, conv: cattrs.Converter) -> Any:
    inner = list_structure_factory(t, conv)

    def hook(value: Any, tp: Any) -> Any:
        if not isinstance(value, list):
            raise TypeError(f"expected array, got {type(value).__name__}")
        return inner(value, tp)

    return hook


converter = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)
for _tp in (int, str, bool, float):
    converter.register_structure_hook(_tp, _strict(_tp))
converter.register_structure_hook_func(
    lambda t: t is dict or getattr(t, "__origin__", None) is dict, _strict_dict
)
converter.register_structure_hook_factory(
    lambda t: getattr(t, "__origin__", None) is list, _strict_list_factory
)
converter.register_structure_hook_factory(
    attrs.has,
    lambda cl: make_dict_structure_fn(cl, converter, _cattrs_forbid_extra_keys=True),
)


_FIELD_MARK = "\x00field="


def _format(exc: BaseException, tp: type | None) -> str:
    if isinstance(exc, FieldError):
        return f"{exc}{_FIELD_MARK}{exc.field}"
    if isinstance(exc, ValueError) and attrs_name_re.match(str(exc)):
        # attrs' own validators start with "'name' must ..."
        name = attrs_name_re.match(str(exc)).group(1)  # type: ignore[union-attr]
        return f"{exc}{_FIELD_MARK}{name}"
    if isinstance(exc, cattrs.ForbiddenExtraKeysError):
        name = sorted(exc.extra_fields)[0][:64]
        return f"unknown field {name!r}{_FIELD_MARK}{name}"
    if isinstance(exc, KeyError | ValueError | TypeError):
        return cattrs.v.format_exception(exc, tp)
    return "invalid value"  # never echo an unexpected exception's text


attrs_name_re = re.compile(r"^'([a-z_]+)'")


def _split(message: str) -> tuple[str, str]:
    text, _, where = message.rpartition(" @ ")
    path = where.removeprefix("$").removeprefix(".")
    if _FIELD_MARK in text:
        text, _, name = text.partition(_FIELD_MARK)
        path = f"{path}.{name}" if path else name
    return text, path or "$"


def structure(data: Any, cls: type[T]) -> T:
    """Build ``cls`` from decoded JSON, strictly.

    Raises ``MalformedBody`` when ``data`` is not a JSON object, ``ValidationFailed`` with the
    field path of the first problem otherwise (``events[0].key``).
    """
    if not isinstance(data, Mapping):
        raise errors.MalformedBody("the body must be a JSON object", field="$")
    try:
        return converter.structure(data, cls)
    except cattrs.BaseValidationError as exc:
        problems = [_split(m) for m in cattrs.transform_error(exc, format_exception=_format)]
        text, path = problems[0] if problems else (str(exc), "$")
        raise errors.ValidationFailed(
            text,
            field=path,
            details={"problems": [{"field": p, "message": t} for t, p in problems[:20]]},
        ) from None
    except FieldError as exc:  # validators outside detailed validation
        raise errors.ValidationFailed(str(exc), field=exc.field) from None
    except (ValueError, TypeError):
        raise errors.ValidationFailed("the body does not match the expected shape") from None


def unstructure(obj: Any) -> Any:
    """The JSON-ready form of a wire record."""
    return converter.unstructure(obj)


def canonical_digest(obj: Any) -> str:
    """Hex SHA-256 of the canonical JSON of ``obj`` (sorted keys, no spaces)."""
    raw = json.dumps(unstructure(obj), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(raw.encode()).hexdigest()


__all__ = ["canonical_digest", "converter", "structure", "unstructure"]
