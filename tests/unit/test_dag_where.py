"""``where`` on an event (``trace_core.dag.event_matches``): each operator, the kinds of value
that compare, and fields an event does not carry."""

from __future__ import annotations

from typing import Any

import pytest

from trace_core import errors
from trace_core.dag import event_matches, where_conditions


@pytest.mark.parametrize(
    ("where", "payload", "passes"),
    [
        ({"start": {"gte": 10}}, {"start": 10}, True),
        ({"start": {"gte": 10}}, {"start": 9}, False),
        ({"start": {"gt": 10}}, {"start": 10}, False),
        ({"start": {"lt": 10}}, {"start": 9.5}, True),
        ({"start": {"lte": 10}}, {"start": 11}, False),
        ({"start": {"eq": 3}}, {"start": 3.0}, True),
        ({"start": {"ne": 3}}, {"start": 3}, False),
        ({"start": {"in": [1, 2]}}, {"start": 2}, True),
        ({"start": {"not_in": [1, 2]}}, {"start": 2}, False),
        # uint256 and decimal values are strings: they compare as numbers
        ({"value": {"gt": "99999999999999999999"}}, {"value": "100000000000000000000"}, True),
        ({"value": {"gte": 5}}, {"value": "10"}, True),
        # text compares as text (ISO timestamps order)
        ({"ts": {"gte": "2026-01-02"}}, {"ts": "2026-01-10T00:00:00Z"}, True),
        ({"ts": {"lt": "2026-01-02"}}, {"ts": "2026-01-10"}, False),
        ({"name": {"eq": "a"}}, {"name": "b"}, False),
        # booleans equal booleans only
        ({"ok": {"eq": True}}, {"ok": True}, True),
        ({"ok": {"eq": True}}, {"ok": 1}, False),
        # a value of another kind does not compare
        ({"start": {"gte": 10}}, {"start": "ten"}, False),
        ({"start": {"gte": 10}}, {"start": [10]}, False),
        ({"start": {"gte": 10}}, {"start": None}, False),
        # a field the event does not carry decides nothing, except is_null
        ({"start": {"gte": 10}}, {"i": 1}, True),
        ({"start": {"is_null": True}}, {"i": 1}, True),
        ({"start": {"is_null": False}}, {"i": 1}, False),
        ({"start": {"is_null": True}}, {"start": 1}, False),
        # conditions are ANDed
        ({"start": {"gte": 10, "lt": 20}}, {"start": 15}, True),
        ({"start": {"gte": 10, "lt": 20}}, {"start": 25}, False),
        ({"start": {"gte": 10}, "end": {"lte": 20}}, {"start": 15, "end": 30}, False),
    ],
)
def test_event_matches(where: dict[str, Any], payload: dict[str, Any], passes: bool) -> None:
    assert event_matches(where_conditions(where), payload) is passes


def test_where_conditions_refuses_what_validation_refuses() -> None:
    with pytest.raises(errors.ValidationFailed):
        where_conditions({"start": {"like": "x"}})
    with pytest.raises(errors.ValidationFailed):
        where_conditions("start > 1")
