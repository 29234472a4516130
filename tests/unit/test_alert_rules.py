"""Detection and routing rules (trace_core.alert_rules): the threshold detector, deterministic
alert keys, contextual event time, config and row errors naming the field, the staleness gate
of routes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trace_core import errors
from trace_core.alert_rules import Route, TransferThreshold, alert_key, route_event
from trace_core.delivery import DeliveryState

WATCHED = "0x" + "ab" * 20
OTHER = "0x" + "01" * 20
THIRD = "0x" + "02" * 20
BLOCK_TIME = datetime(2026, 1, 1, tzinfo=UTC)


def row(amount: Any, frm: str = OTHER, to: str = WATCHED, **kw: Any) -> dict[str, Any]:
    base = {
        "value": amount,
        "from_address": frm,
        "to_address": to,
        "block_timestamp": int(BLOCK_TIME.timestamp()),
        "transaction_hash": "0x" + "cd" * 32,
        "log_index": 3,
    }
    base.update(kw)
    return base


def detector(**config: Any) -> TransferThreshold:
    return TransferThreshold.from_config(
        "large-transfers",
        {"min_amount": "1000", "addresses": [WATCHED.upper().replace("0X", "0x")], **config},
    )


def test_threshold_and_addresses() -> None:
    d = detector()
    rows = [
        row(999),
        row("1000"),
        row(10**30, frm=WATCHED, to=OTHER, log_index=4),
        row(10**30, frm=OTHER, to=THIRD, log_index=5),  # not a watched address
    ]
    events = d.detect(rows)
    assert [e.details["amount"] for e in events] == ["1000", str(10**30)]
    assert events[0].event_time == BLOCK_TIME  # from the row, not the clock
    assert events[0].severity == "warning"
    assert "transfer of 1000" in events[0].summary
    # no addresses: every large transfer
    every = TransferThreshold.from_config("all", {"min_amount": 1000})
    assert len(every.detect(rows)) == 3


def test_keys_are_deterministic() -> None:
    d = detector()
    first = d.detect([row(5000)])
    assert first == d.detect([row(5000)])
    assert first[0].alert_key == alert_key("large-transfers", ["0x" + "cd" * 32, 3])
    assert d.detect([row(5000, log_index=4)])[0].alert_key != first[0].alert_key
    other = TransferThreshold.from_config("other", {"min_amount": "1000"})
    assert other.detect([row(5000)])[0].alert_key != first[0].alert_key
    assert alert_key("a", ["b", "c"]) != alert_key("a", ["bc"])


@pytest.mark.parametrize(
    "when",
    [1767225600, "2026-01-01T00:00:00+00:00", "2026-01-01T00:00:00", datetime(2026, 1, 1)],
)
def test_event_time_forms(when: Any) -> None:
    (event,) = detector().detect([row(5000, block_timestamp=when)])
    assert event.event_time == BLOCK_TIME


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({}, "config.min_amount"),
        ({"min_amount": -1}, "config.min_amount"),
        ({"min_amount": "1e3"}, "config.min_amount"),
        ({"min_amount": True}, "config.min_amount"),
        ({"min_amount": 1, "addresses": "0xab"}, "config.addresses"),
        ({"min_amount": 1, "addresses": ["0x12"]}, "config.addresses[0]"),
        ({"min_amount": 1, "severity": "loud"}, "config.severity"),
        ({"min_amount": 1, "key_fields": []}, "config.key_fields"),
        ({"min_amount": 1, "amount_field": ""}, "config.amount_field"),
        ({"min_amount": 1, "bogus": 1}, "config.bogus"),
    ],
)
def test_bad_config_names_the_field(config: dict[str, Any], field: str) -> None:
    with pytest.raises(errors.ValidationFailed) as exc:
        TransferThreshold.from_config("d", config)
    assert exc.value.field == field


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        (row(1.5), "rows[1].value"),
        (row(5000, frm="nobody"), "rows[1].from_address"),
        (row(5000, block_timestamp="yesterday"), "rows[1].block_timestamp"),
        ({k: v for k, v in row(5000).items() if k != "log_index"}, "rows[1].log_index"),
    ],
)
def test_bad_rows_name_row_and_field(bad: dict[str, Any], field: str) -> None:
    with pytest.raises(errors.ValidationFailed) as exc:
        detector().detect([row(5000), bad])
    assert exc.value.field == field


def test_routes_gate_staleness_and_severity() -> None:
    (event,) = detector(severity="error").detect([row(5000)])
    live = Route("pages", ("ops", "slack"), max_delivery_age=timedelta(hours=1))
    routed = route_event(event, live, now=BLOCK_TIME + timedelta(minutes=5))
    assert [(r.destination, r.state) for r in routed] == [
        ("ops", DeliveryState.DUE),
        ("slack", DeliveryState.DUE),
    ]
    # a backfill over old blocks: recorded, suppressed with the reason, never due
    late = route_event(event, live, now=BLOCK_TIME + timedelta(days=30))
    assert {r.state for r in late} == {DeliveryState.SUPPRESSED}
    assert all("max_delivery_age" in (r.suppressed_reason or "") for r in late)
    # no gate: always due
    assert (
        route_event(event, Route("all", ("ops",)), now=BLOCK_TIME + timedelta(days=30))[0].state
        is DeliveryState.DUE
    )
    assert (
        route_event(event, Route("crit", ("ops",), min_severity="critical"), now=BLOCK_TIME) == []
    )


@given(st.integers(0, 10**40), st.integers(0, 10**40))
def test_threshold_is_exact(amount: int, threshold: int) -> None:
    d = TransferThreshold.from_config("t", {"min_amount": str(threshold)})
    assert len(d.detect([row(str(amount))])) == (1 if amount >= threshold else 0)
