"""What a JSON value may hold before it goes anywhere near PostgreSQL.

Every JSON value Trace accepts (request bodies, task payloads, events, results) ends up in a
``jsonb`` column. PostgreSQL refuses some values that Python's ``json`` module produces or
accepts, and it refuses them late -- inside a transaction that may carry other callers' work:

* ``\\u0000`` in a string or key, and lone surrogates (U+D800..U+DFFF): jsonb stores text in
  the database encoding, which has neither;
* ``NaN``, ``Infinity``, ``-Infinity`` and numbers that overflow a float (``1e400``): jsonb
  numbers are finite;
* integers of thousands of digits (Python refuses to parse more than 4,300 digits, and such a
  value is never a legitimate payload);
* nesting deeper than a few hundred levels (PostgreSQL's and Python's recursion limits).

This module refuses all of them at the edge, with a ``ValidationFailed`` that names the field
path (``result.a[3].b``), so nothing unstorable reaches SQL and nothing that reaches SQL can fail
a neighbour's transaction. ``loads`` is for bytes from outside (it parses); ``check`` is for values
that in-process callers built themselves (no parsing). Messages name the limit, never a Python
exception or a backend's text.

Integers beyond ``max_int_abs`` (2**256, so every uint256 passes) must be sent as strings.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any, Final

import attrs

from trace_core import errors


@attrs.frozen
class JsonLimits:
    """The limits a JSON value must keep (``docs/standards/operations.md``, input limits)."""

    #: Deepest nesting of arrays and objects; the top-level object is depth 1.
    max_depth: int = 64
    #: Largest absolute value of an integer: every uint256 passes; send larger ones as strings.
    max_int_abs: int = 2**256
    #: Longest string or object key, in characters (the request body limit caps it anyway).
    max_string_chars: int = 1024 * 1024

    @property
    def max_int_digits(self) -> int:
        """Digits of the largest allowed integer: longer literals are refused unparsed."""
        return len(str(self.max_int_abs))


DEFAULT_LIMITS: Final = JsonLimits()


@attrs.frozen
class _Refused:
    """Stands in, during parsing, for a number that may not be stored; ``check`` reports it
    with its field path."""

    message: str


_SURROGATE = re.compile("[\ud800-\udfff]")
_PLAIN_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]{0,63}$")


def loads(body: bytes | str, *, limits: JsonLimits = DEFAULT_LIMITS) -> Any:
    """Parse a JSON document from outside and check it against ``limits``.

    Returns the decoded value. Raises ``MalformedBody`` when ``body`` is not JSON (or not
    UTF-8), ``ValidationFailed`` naming the field path when it holds a value jsonb cannot store
    or one over ``limits`` (non-finite or overflowing numbers, integers over ``max_int_abs``,
    NUL or lone surrogates, nesting deeper than ``max_depth``).
    """
    if isinstance(body, bytes):
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise errors.MalformedBody("the body is not UTF-8 text", field="$") from None
    else:
        text = body
    try:
        value = json.loads(
            text,
            parse_constant=_refuse_constant,
            parse_float=_parse_float,
            parse_int=_int_parser(limits),
        )
    except RecursionError:
        raise _too_deep(limits, "$") from None
    except json.JSONDecodeError as exc:
        raise errors.MalformedBody(
            f"the body is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})",
            field="$",
        ) from None
    check(value, limits=limits)
    return value


def check(value: object, *, path: str = "", limits: JsonLimits = DEFAULT_LIMITS) -> None:
    """Check a value an in-process caller built against ``limits``, without parsing.

    ``path`` is the field path of ``value`` itself (``"result"``); problems are reported below
    it (``result.a[3].b``). JSON types are ``dict`` with ``str`` keys, ``list`` (or ``tuple``),
    ``str``, ``int``, ``float``, ``bool`` and ``None``. Raises ``ValidationFailed`` naming the
    first offending field.
    """
    _check(value, path, 0, limits)


def _check(value: object, path: str, depth: int, limits: JsonLimits) -> None:
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, str):
        _check_text(value, path, limits, what="string")
    elif isinstance(value, int):
        if abs(value) > limits.max_int_abs:
            raise _failed(_int_message(limits), path)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise _failed("numbers must be finite (no NaN or Infinity)", path)
    elif isinstance(value, Mapping):
        if depth + 1 > limits.max_depth:
            raise _too_deep(limits, path)
        for key, item in value.items():
            if not isinstance(key, str):
                raise _failed("object keys must be strings", path)
            where = _join_key(path, key)
            _check_text(key, where, limits, what="key")
            _check(item, where, depth + 1, limits)
    elif isinstance(value, list | tuple):
        if depth + 1 > limits.max_depth:
            raise _too_deep(limits, path)
        for i, item in enumerate(value):
            _check(item, f"{path}[{i}]", depth + 1, limits)
    elif isinstance(value, _Refused):
        raise _failed(value.message, path)
    else:
        raise _failed(f"{type(value).__name__} is not a JSON type", path)


def _check_text(text: str, path: str, limits: JsonLimits, *, what: str) -> None:
    if len(text) > limits.max_string_chars:
        raise _failed(f"a {what} may hold at most {limits.max_string_chars} characters", path)
    if "\x00" in text:
        raise _failed(f"a {what} may not contain NUL (\\u0000)", path)
    if _SURROGATE.search(text):
        raise _failed(f"a {what} may not contain a lone surrogate (\\ud800-\\udfff)", path)


def _join_key(path: str, key: str) -> str:
    if _PLAIN_KEY.match(key):
        return f"{path}.{key}" if path else key
    # Quote odd keys; ensure_ascii keeps NUL and surrogates printable in the error body.
    quoted = json.dumps(key if len(key) <= 64 else key[:64] + "...")
    return f"{path}[{quoted}]"


def _failed(message: str, path: str) -> errors.ValidationFailed:
    return errors.ValidationFailed(message, field=path or "$")


def _too_deep(limits: JsonLimits, path: str) -> errors.ValidationFailed:
    return _failed(f"arrays and objects may nest at most {limits.max_depth} levels", path)


def _int_message(limits: JsonLimits) -> str:
    bound = "2**256" if limits.max_int_abs == 2**256 else str(limits.max_int_abs)
    return f"integers must be within +/-{bound} (send larger ones as strings)"


def _refuse_constant(name: str) -> _Refused:
    return _Refused(f"numbers must be finite ({name} is not allowed)")


def _parse_float(literal: str) -> float | _Refused:
    value = float(literal)
    if not math.isfinite(value):
        return _Refused("numbers must be finite (this one overflows)")
    return value


def _int_parser(limits: JsonLimits) -> Any:
    max_digits = limits.max_int_digits

    def parse_int(literal: str) -> int | _Refused:
        # Count before converting: int() of a huge literal is slow, then refused by Python.
        if len(literal.lstrip("-")) > max_digits:
            return _Refused(_int_message(limits))
        return int(literal)

    return parse_int


__all__ = ["DEFAULT_LIMITS", "JsonLimits", "check", "loads"]
