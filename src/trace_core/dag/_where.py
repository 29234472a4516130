"""``where`` applied to an event: the fan-out creates a consumer's task only for events whose
payload passes the consuming input's conditions (``docs/specs/dag.md``, "where").

An event announces what its producer wrote (a block range, a partition key, counts), not the
rows themselves, so a condition decides on the fields the event's payload carries:

* conditions are ANDed; a condition on a field the payload does not carry decides nothing
  (the event passes it; the operator reads its input with the filter), except ``is_null:
  true``, which an absent field passes and ``is_null: false`` fails;
* numbers compare as numbers, and so do strings that spell decimal numbers (``uint256`` and
  ``decimal`` values are written as strings); other strings compare as text (ISO timestamps
  and dates order correctly); booleans only equal booleans;
* a value of another kind than the operand (a string against a number that is not a decimal
  string, a mapping, a list) fails the comparison.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

from trace_core import errors
from trace_core.dag._reader import Reader
from trace_core.dag._records import Condition

_DECIMAL = re.compile(r"^-?[0-9]+(\.[0-9]+)?$")


def where_conditions(doc: object) -> tuple[Condition, ...]:
    """The conditions of a stored ``where`` map (``{field: {op: value}}``, as ``to_doc``
    writes it). Raises ``ValidationFailed`` naming the first problem."""
    reader = Reader()
    conditions = reader.where(doc, "where")
    if reader.problems:
        first = reader.problems[0]
        raise errors.ValidationFailed(f"{first.path}: {first.message}", field=first.path)
    return conditions


def event_matches(conditions: Iterable[Condition], payload: Mapping[str, Any]) -> bool:
    """Whether an event's ``payload`` passes every condition (see the module docstring)."""
    return all(_passes(c, payload) for c in conditions)


def _number(value: object) -> Decimal | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return Decimal(value)
    if isinstance(value, str) and _DECIMAL.match(value):
        try:
            return Decimal(value)
        except InvalidOperation:  # pragma: no cover - the pattern admits only decimals
            return None
    return None


def _equal(a: object, b: object) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    na, nb = _number(a), _number(b)
    if na is not None and nb is not None:
        return na == nb
    return isinstance(a, str) and isinstance(b, str) and a == b


def _order(a: object, b: object) -> int | None:
    """-1, 0, 1, or None when ``a`` and ``b`` do not compare."""
    na, nb = _number(a), _number(b)
    if na is not None and nb is not None:
        return (na > nb) - (na < nb)
    if isinstance(a, str) and isinstance(b, str):
        return (a > b) - (a < b)
    return None


def _passes(c: Condition, payload: Mapping[str, Any]) -> bool:
    present = c.field in payload
    value = payload.get(c.field)
    if c.op == "is_null":
        return (value is None) is bool(c.value)
    if not present:
        return True
    if value is None:
        return False
    match c.op:
        case "eq":
            return _equal(value, c.value)
        case "ne":
            return not _equal(value, c.value)
        case "in":
            return any(_equal(value, v) for v in c.value)
        case "not_in":
            return not any(_equal(value, v) for v in c.value)
    order = _order(value, c.value)
    if order is None:
        return False
    match c.op:
        case "lt":
            return order < 0
        case "lte":
            return order <= 0
        case "gt":
            return order > 0
        case "gte":
            return order >= 0
    return False  # pragma: no cover - WHERE_OPERATORS is matched above
