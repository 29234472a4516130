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
from trace_core.alert_rules import (
    ALERT_EVENTS_SCHEMA,
    SEVERITIES,
    AlertEvent,
    FieldAbove,
    Route,
    TransferThreshold,
    alert_key,
    event_from_row,
    event_row,
    plan_deliveries,
    route_event,
    routes_from_config,
    rule_from_config,
)
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


# --- field_above, rule configs, labels, the alert_events rows, routes from config -----------


def test_field_above_is_a_gas_spike_detector_with_block_time() -> None:
    rule = rule_from_config(
        "gas", {"rule": "field_above", "field": "gas_used", "min_value": 1_000_000}
    )
    assert isinstance(rule, FieldAbove)
    when = int(BLOCK_TIME.timestamp())
    blocks = [
        {"block_number": 7, "gas_used": 21_000, "timestamp": when},
        {"block_number": 8, "gas_used": 1_000_000, "timestamp": when},
    ]
    (event,) = rule.detect(blocks)
    assert event.event_time == BLOCK_TIME
    assert event.alert_key == alert_key("gas", [8])
    assert event.details == {"gas_used": "1000000", "block_number": 8}
    with pytest.raises(errors.ValidationFailed) as exc:
        rule.detect([{"block_number": 9, "timestamp": when}])
    assert exc.value.field == "rows[0].gas_used"


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"rule": "nope"}, "config.rule"),
        ({"rule": "field_above", "min_value": 1}, "config.field"),
        ({"rule": "field_above", "field": "g"}, "config.min_value"),
        ({"rule": "field_above", "field": "g", "min_value": -1}, "config.min_value"),
        ({"rule": "field_above", "field": "g", "min_value": 1, "x": 1}, "config.x"),
        ({"rule": "transfer_threshold", "min_amount": 1, "labels": []}, "config.labels"),
        ({"rule": "transfer_threshold", "min_amount": 1, "labels": {"A B": "x"}}, "config.labels"),
        ({"rule": "transfer_threshold", "min_amount": 1, "labels": {"a": 1}}, "config.labels.a"),
    ],
)
def test_rule_config_errors_name_the_field(config: dict[str, Any], field: str) -> None:
    with pytest.raises(errors.ValidationFailed) as exc:
        rule_from_config("d", config)
    assert exc.value.field == field


def test_an_event_survives_its_alert_events_row() -> None:
    (event,) = detector(labels={"team": "ops"}).detect([row(5000, transaction_hash=b"\x01\x02")])
    assert event.details["transaction_hash"] == "0x0102"  # bytes as hex, in key and payload
    stored = event_row(event)
    assert set(stored) == set(ALERT_EVENTS_SCHEMA)
    back = event_from_row({**stored, "event_time": BLOCK_TIME})  # as read from the table
    assert back == event
    assert event_from_row(stored) == event  # as JSON
    with pytest.raises(errors.ValidationFailed) as exc:
        event_from_row({**stored, "alert_key": "x"}, "rows[3]")
    assert exc.value.field == "rows[3].alert_key"


def test_routes_from_config_select_by_severity_and_labels() -> None:
    routes = routes_from_config(
        [
            {"name": "pages", "destinations": ["ops", "ops", "slack"], "min_severity": "error",
             "max_delivery_age": "15m"},
            {"name": "team", "destinations": ["team"], "labels": {"team": "treasury"}},
        ]
    )  # fmt: skip
    assert routes[0].destinations == ("ops", "slack")
    assert routes[0].max_delivery_age == timedelta(minutes=15)
    warn = detector(labels={"team": "treasury"}).detect([row(5000)])
    err = detector(severity="error", labels={"team": "infra"}).detect([row(6000)])
    planned = plan_deliveries([*warn, *err], routes)
    assert [(p.alert_key, p.route, p.destination) for p in planned] == [
        (warn[0].alert_key, "team", "team"),
        (err[0].alert_key, "pages", "ops"),
        (err[0].alert_key, "pages", "slack"),
    ]
    assert planned[1].max_delivery_age == timedelta(minutes=15)
    assert planned[1].payload["summary"] == err[0].summary
    assert plan_deliveries([*warn, *err], routes) == planned  # deterministic


@pytest.mark.parametrize(
    ("routes", "field"),
    [
        ([], "config.routes"),
        ("x", "config.routes"),
        ([{"name": "a"}], "config.routes[0].destinations"),
        ([{"name": "A!", "destinations": ["o"]}], "config.routes[0].name"),
        ([{"name": "a", "destinations": ["O K"]}], "config.routes[0].destinations[0]"),
        ([{"name": "a", "destinations": ["o"], "max_delivery_age": "soon"}],
         "config.routes[0].max_delivery_age"),
        ([{"name": "a", "destinations": ["o"], "max_delivery_age": 0}],
         "config.routes[0].max_delivery_age"),
        ([{"name": "a", "destinations": ["o"], "min_severity": "meh"}],
         "config.routes[0].min_severity"),
        ([{"name": "a", "destinations": ["o"], "x": 1}], "config.routes[0].x"),
        ([{"name": "a", "destinations": ["o"]}, {"name": "a", "destinations": ["p"]}],
         "config.routes[1].name"),
    ],
)  # fmt: skip
def test_route_config_errors_name_the_field(routes: Any, field: str) -> None:
    with pytest.raises(errors.ValidationFailed) as exc:
        routes_from_config(routes)
    assert exc.value.field == field


_names = st.sampled_from(["ops", "audit", "pager", "team"])
_labels = st.dictionaries(st.sampled_from(["team", "chain"]), st.sampled_from(["a", "b"]))


@given(
    st.lists(st.tuples(st.integers(0, 50), st.sampled_from(SEVERITIES), _labels), max_size=8),
    st.lists(
        st.tuples(st.lists(_names, min_size=1, max_size=3), st.sampled_from(SEVERITIES), _labels),
        min_size=1,
        max_size=4,
    ),
)
def test_plan_deliveries_is_exactly_the_matching_pairs_once(
    raw_events: list[tuple[int, str, dict[str, str]]],
    raw_routes: list[tuple[list[str], str, dict[str, str]]],
) -> None:
    events = [
        AlertEvent(alert_key("d", [i]), BLOCK_TIME, "s", sev, {}, labels=lb)
        for i, sev, lb in raw_events
    ]
    routes = routes_from_config(
        [
            {"name": f"r{j}", "destinations": dests, "min_severity": sev, "labels": lb}
            for j, (dests, sev, lb) in enumerate(raw_routes)
        ]
    )
    planned = plan_deliveries(events, routes)
    got = [(p.alert_key, p.route, p.destination) for p in planned]
    want = [
        (e.alert_key, r.name, d)
        for e in events
        for r in routes
        if SEVERITIES.index(e.severity) >= SEVERITIES.index(r.min_severity)
        and all(e.labels.get(k) == v for k, v in r.labels.items())
        for d in dict.fromkeys(r.destinations)
    ]
    assert got == want
    assert plan_deliveries(events, routes) == planned  # deterministic
