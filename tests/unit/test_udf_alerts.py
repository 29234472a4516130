"""``trace_udf.alerts``: a UDF's alert events are the rows the built-in detector writes (the
same key derivation, read back by ``alert_route``), and bad input is refused naming it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trace_core import alert_rules
from trace_udf import alerts


@given(st.text(min_size=1), st.lists(st.one_of(st.text(), st.integers()), min_size=1))
def test_the_key_is_the_platforms(detector: str, key_values: list[object]) -> None:
    assert alerts.alert_key(detector, key_values) == alert_rules.alert_key(detector, key_values)


def test_the_columns_are_the_datasets_schema() -> None:
    assert alerts.ALERT_EVENTS_COLUMNS == dict(alert_rules.ALERT_EVENTS_SCHEMA)
    assert alerts.SEVERITIES == alert_rules.SEVERITIES


def test_a_row_reads_back_as_the_event_alert_route_routes() -> None:
    when = datetime(2026, 12, 1, 3, 0, tzinfo=timezone(timedelta(hours=2)))
    row = alerts.alert_event(
        "bursts", ["0xaa", "0x01", 0], event_time=when, summary="3 transfers",
        severity="error", labels={"team": "treasury"}, details={"transfers": 3},
    )  # fmt: skip
    assert set(row) == set(alerts.ALERT_EVENTS_COLUMNS)
    event = alert_rules.event_from_row(row)
    assert event.alert_key == alert_rules.alert_key("bursts", ["0xaa", "0x01", 0])
    assert event.event_time == when and event.event_time.tzinfo == UTC
    assert (event.severity, event.summary, event.detector) == ("error", "3 transfers", "bursts")
    assert event.labels == {"team": "treasury"} and event.details == {"transfers": 3}
    same = alerts.alert_event("bursts", ["0xaa", "0x01", 0], event_time="2026-12-01T01:00:00Z",
                              summary="3 transfers", severity="error")  # fmt: skip
    assert same["alert_key"] == row["alert_key"] and same["event_time"] == row["event_time"]


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"detector": ""}, "detector"),
        ({"key_values": []}, "key_values"),
        ({"severity": "loud"}, "severity"),
        ({"event_time": datetime(2026, 12, 1)}, "time zone"),
        ({"event_time": "yesterday"}, "ISO 8601"),
        ({"labels": {"team": 1}}, "labels"),
    ],
)
def test_bad_input_is_refused_naming_it(kwargs: dict[str, object], fragment: str) -> None:
    args: dict[str, object] = {
        "detector": "bursts",
        "key_values": ["k"],
        "event_time": datetime(2026, 12, 1, tzinfo=UTC),
        "summary": "s",
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=fragment):
        alerts.alert_event(**args)  # type: ignore[arg-type,unused-ignore]
