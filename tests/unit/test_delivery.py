"""The alert delivery state machine (trace_core.delivery): every (state, event) pair, the
decisions, the retry schedule, Retry-After, keys, and a hypothesis model of one delivery."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trace_core import errors
from trace_core.delivery import (
    DEFAULT_SCHEDULE,
    MAX_RETRY_AFTER_S,
    TRANSITIONS,
    DeliveryEvent,
    DeliveryState,
    DeliveryView,
    Fence,
    LeaseDecision,
    LeasePolicy,
    RetrySchedule,
    SendResult,
    SettleDecision,
    apply,
    classify_response,
    decide_create,
    decide_disable,
    decide_expire,
    decide_lease,
    decide_outcome,
    decide_retry,
    delivery_key,
    mermaid_diagram,
    parse_retry_after,
    target_state,
    webhook_id,
)

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
S = DeliveryState
E = DeliveryEvent

#: The legal pairs, written out independently of the module's table.
EXPECTED = {
    (S.DUE, E.LEASE): S.IN_FLIGHT,
    (S.DUE, E.DISABLE): S.DISABLED,
    (S.IN_FLIGHT, E.SUCCEED): S.SENT,
    (S.IN_FLIGHT, E.FAIL): (S.DUE, S.FAILED),
    (S.IN_FLIGHT, E.RATE_LIMITED): (S.DUE, S.FAILED),
    (S.IN_FLIGHT, E.EXPIRE): (S.DUE, S.FAILED),
    (S.IN_FLIGHT, E.GONE): S.DISABLED,
    (S.IN_FLIGHT, E.REFUSE): S.FAILED,
    (S.FAILED, E.RETRY): S.DUE,
    (S.DISABLED, E.RETRY): S.DUE,
    (S.SUPPRESSED, E.RETRY): S.DUE,
}


@pytest.mark.parametrize(("state", "event"), list(itertools.product(S, E)))
def test_every_state_event_pair(state: DeliveryState, event: DeliveryEvent) -> None:
    expected = EXPECTED.get((state, event))
    if expected is None:
        with pytest.raises(errors.Conflict):
            target_state(state, event, attempts_left=True)
        with pytest.raises(errors.Conflict):
            target_state(state, event, attempts_left=False)
        return
    with_left = target_state(state, event, attempts_left=True)
    without = target_state(state, event, attempts_left=False)
    if isinstance(expected, tuple):
        assert (with_left, without) == expected
    else:
        assert with_left == without == expected


def test_table_is_the_expected_one() -> None:
    assert dict(TRANSITIONS) == EXPECTED
    assert "in_flight --> sent: succeed" in mermaid_diagram()


def test_sent_is_final() -> None:
    for event in E:
        with pytest.raises(errors.Conflict):
            target_state(S.SENT, event, attempts_left=True)


def view(**kw: object) -> DeliveryView:
    base: dict[str, object] = {
        "delivery_id": "d1",
        "state": S.DUE,
        "attempt": 0,
        "lease_token": None,
        "lease_expires_at": None,
        "available_at": NOW,
    }
    base.update(kw)
    return DeliveryView(**base)  # type: ignore[arg-type,unused-ignore]


def in_flight(attempt: int = 1) -> tuple[DeliveryView, Fence]:
    v = view(
        state=S.IN_FLIGHT,
        attempt=attempt,
        lease_token="tok",
        lease_expires_at=NOW + timedelta(seconds=60),
    )
    return v, Fence("d1", attempt, "tok")


SCHEDULE = RetrySchedule((0.0, 10.0, 100.0))


# --- create ---------------------------------------------------------------------------------


def test_create_due_or_suppressed_by_age() -> None:
    assert decide_create(event_time=NOW, now=NOW, max_delivery_age=None) == (S.DUE, None)
    old = NOW - timedelta(hours=2)
    assert decide_create(event_time=old, now=NOW, max_delivery_age=None) == (S.DUE, None)
    assert decide_create(event_time=old, now=NOW, max_delivery_age=timedelta(hours=3))[0] is S.DUE
    state, reason = decide_create(event_time=old, now=NOW, max_delivery_age=timedelta(hours=1))
    assert state is S.SUPPRESSED
    assert reason == "event is 7200 s old; max_delivery_age is 3600 s"


# --- lease ----------------------------------------------------------------------------------


def test_lease_starts_a_new_attempt() -> None:
    d = decide_lease(
        view(attempt=2),
        now=NOW,
        lease=LeasePolicy(lease_s=30),
        new_lease_token="t2",
        destination_enabled=True,
    )
    assert d == LeaseDecision(
        attempt=3, lease_token="t2", lease_expires_at=NOW + timedelta(seconds=30)
    )
    assert apply(view(attempt=2), d).state is S.IN_FLIGHT


def test_lease_of_disabled_destination_disables() -> None:
    d = decide_lease(
        view(), now=NOW, lease=LeasePolicy(), new_lease_token="t", destination_enabled=False
    )
    assert isinstance(d, SettleDecision)
    assert d.state is S.DISABLED and d.event is E.DISABLE


@pytest.mark.parametrize("state", [s for s in S if s is not S.DUE])
def test_lease_refused_unless_due(state: DeliveryState) -> None:
    with pytest.raises(errors.Conflict):
        decide_lease(
            view(state=state),
            now=NOW,
            lease=LeasePolicy(),
            new_lease_token="t",
            destination_enabled=True,
        )


def test_lease_refused_before_available() -> None:
    with pytest.raises(errors.Conflict):
        decide_lease(
            view(available_at=NOW + timedelta(seconds=1)),
            now=NOW,
            lease=LeasePolicy(),
            new_lease_token="t",
            destination_enabled=True,
        )


# --- outcomes -------------------------------------------------------------------------------


def test_success_sends() -> None:
    v, f = in_flight()
    d = decide_outcome(v, f, SendResult(E.SUCCEED, 200), now=NOW, schedule=SCHEDULE, rand=0.5)
    assert d.state is S.SENT and not d.disable_destination
    assert apply(v, d).lease_expires_at is None


def test_failure_retries_with_full_jitter_then_fails() -> None:
    v, f = in_flight(1)
    d = decide_outcome(v, f, SendResult(E.FAIL, 500), now=NOW, schedule=SCHEDULE, rand=0.5)
    assert d.state is S.DUE and d.available_at == NOW + timedelta(seconds=5)
    v, f = in_flight(2)
    d = decide_outcome(v, f, SendResult(E.FAIL, 500), now=NOW, schedule=SCHEDULE, rand=0.25)
    assert d.available_at == NOW + timedelta(seconds=25)
    v, f = in_flight(3)  # the last attempt of a three-step schedule
    d = decide_outcome(
        v, f, SendResult(E.FAIL, None, error="timeout"), now=NOW, schedule=SCHEDULE, rand=0.5
    )
    assert d.state is S.FAILED and d.error == "timeout"


def test_rate_limited_waits_at_least_retry_after() -> None:
    v, f = in_flight(1)
    result = SendResult(E.RATE_LIMITED, 429, retry_after_s=60.0)
    d = decide_outcome(v, f, result, now=NOW, schedule=SCHEDULE, rand=0.0)
    assert d.state is S.DUE and d.available_at == NOW + timedelta(seconds=60)
    # a schedule delay longer than Retry-After wins
    d = decide_outcome(
        v,
        f,
        SendResult(E.RATE_LIMITED, 429, retry_after_s=1.0),
        now=NOW,
        schedule=SCHEDULE,
        rand=0.9,
    )
    assert d.available_at == NOW + timedelta(seconds=9)


def test_gone_disables_destination() -> None:
    v, f = in_flight()
    d = decide_outcome(v, f, SendResult(E.GONE, 410), now=NOW, schedule=SCHEDULE, rand=0.5)
    assert d.state is S.DISABLED and d.disable_destination


def test_refuse_fails_without_retry() -> None:
    v, f = in_flight(1)
    d = decide_outcome(
        v, f, SendResult(E.REFUSE, error="unsafe address"), now=NOW, schedule=SCHEDULE, rand=0.5
    )
    assert d.state is S.FAILED


@pytest.mark.parametrize("event", [E.LEASE, E.EXPIRE, E.DISABLE, E.RETRY])
def test_non_send_events_are_not_outcomes(event: DeliveryEvent) -> None:
    v, f = in_flight()
    with pytest.raises(errors.Conflict):
        decide_outcome(v, f, SendResult(event), now=NOW, schedule=SCHEDULE, rand=0.5)


@pytest.mark.parametrize(
    ("fence", "state"),
    [
        (Fence("d1", 0, "tok"), S.IN_FLIGHT),  # an older attempt
        (Fence("d1", 2, "tok"), S.IN_FLIGHT),  # no such attempt
        (Fence("d1", 1, "other"), S.IN_FLIGHT),  # wrong token
        (Fence("d2", 1, "tok"), S.IN_FLIGHT),  # another delivery
        (Fence("d1", 1, "tok"), S.DUE),  # the lease expired and the reaper moved it
        (Fence("d1", 1, "tok"), S.SENT),
    ],
)
def test_outcome_fenced(fence: Fence, state: DeliveryState) -> None:
    v, _ = in_flight(1)
    v = view(state=state, attempt=1, lease_token="tok", lease_expires_at=v.lease_expires_at)
    with pytest.raises(errors.LeaseLost):
        decide_outcome(v, fence, SendResult(E.SUCCEED, 200), now=NOW, schedule=SCHEDULE, rand=0)


# --- expire, retry, disable -----------------------------------------------------------------


def test_expire() -> None:
    v, _ = in_flight(1)
    assert decide_expire(v, now=NOW, schedule=SCHEDULE, rand=0.5) is None
    later = NOW + timedelta(seconds=60)
    d = decide_expire(v, now=later, schedule=SCHEDULE, rand=0.5)
    assert d is not None and d.state is S.DUE and d.available_at == later + timedelta(seconds=5)
    last, _ = in_flight(3)
    d = decide_expire(last, now=later, schedule=SCHEDULE, rand=0.5)
    assert d is not None and d.state is S.FAILED
    for state in S:
        if state is not S.IN_FLIGHT:
            assert decide_expire(view(state=state), now=later, schedule=SCHEDULE, rand=0) is None


@pytest.mark.parametrize("state", list(S))
def test_retry(state: DeliveryState) -> None:
    if state in (S.FAILED, S.DISABLED, S.SUPPRESSED):
        d = decide_retry(view(state=state, available_at=NOW - timedelta(days=1)), now=NOW)
        assert d.state is S.DUE and d.available_at == NOW
    else:
        with pytest.raises(errors.Conflict):
            decide_retry(view(state=state), now=NOW)


@pytest.mark.parametrize("state", list(S))
def test_disable(state: DeliveryState) -> None:
    d = decide_disable(view(state=state))
    if state is S.DUE:
        assert d is not None and d.state is S.DISABLED
    else:
        assert d is None


# --- schedule, Retry-After, classification, keys --------------------------------------------


def test_default_schedule_is_the_documented_one() -> None:
    hours = 3600.0
    documented = [0, 5, 300, 1800, 2 * hours, 5 * hours, 10 * hours, 14 * hours, 20 * hours]
    assert list(DEFAULT_SCHEDULE) == [*documented, 24 * hours]
    s = RetrySchedule()
    assert s.max_attempts == 10
    assert s.delay(1, 0.999999) < timedelta(seconds=5)
    assert s.delay(9, 1.0) == timedelta(hours=24)
    assert s.delay(50, 1.0) == timedelta(hours=24)


@pytest.mark.parametrize("bad", [(), (-1.0,), (1.0, -0.5)])
def test_schedule_validated(bad: tuple[float, ...]) -> None:
    with pytest.raises(errors.ValidationFailed):
        RetrySchedule(bad)


@given(attempt=st.integers(1, 100), rand=st.floats(0, 1, exclude_max=True))
def test_jitter_stays_within_the_step(attempt: int, rand: float) -> None:
    s = RetrySchedule()
    step = DEFAULT_SCHEDULE[min(attempt, len(DEFAULT_SCHEDULE) - 1)]
    assert timedelta(0) <= s.delay(attempt, rand) <= timedelta(seconds=step)


def test_parse_retry_after() -> None:
    assert parse_retry_after(None, now=NOW) is None
    assert parse_retry_after("120", now=NOW) == 120.0
    assert parse_retry_after(" 7 ", now=NOW) == 7.0
    assert parse_retry_after("999999999", now=NOW) == MAX_RETRY_AFTER_S
    assert parse_retry_after("Thu, 01 Jan 2026 12:01:30 GMT", now=NOW) == 90.0
    assert parse_retry_after("Thu, 01 Jan 2026 11:00:00 GMT", now=NOW) == 0.0
    assert parse_retry_after("soon", now=NOW) is None
    assert parse_retry_after("-5", now=NOW) is None


@pytest.mark.parametrize(
    ("status", "event"),
    [
        (200, E.SUCCEED),
        (204, E.SUCCEED),
        (299, E.SUCCEED),
        (301, E.FAIL),
        (302, E.FAIL),
        (400, E.FAIL),
        (401, E.FAIL),
        (404, E.FAIL),
        (408, E.FAIL),
        (410, E.GONE),
        (429, E.RATE_LIMITED),
        (500, E.FAIL),
        (503, E.FAIL),
    ],
)
def test_classify_response(status: int, event: DeliveryEvent) -> None:
    result = classify_response(status, retry_after="30", now=NOW)
    assert result.event is event and result.status_code == status
    assert result.retry_after_s == (30.0 if status == 429 else None)


def test_keys_are_deterministic_and_distinct() -> None:
    k = delivery_key("evt-1", "route-a", "dest-1")
    assert k == delivery_key("evt-1", "route-a", "dest-1")
    assert len(k) == 64
    others = {
        delivery_key("evt-2", "route-a", "dest-1"),
        delivery_key("evt-1", "route-b", "dest-1"),
        delivery_key("evt-1", "route-a", "dest-2"),
        k,
    }
    assert len(others) == 4
    assert webhook_id(k) == "msg_" + k[:32]
    # no ambiguity from joining: the separator cannot be shifted between parts
    assert delivery_key("a", "b\x1fc", "d") != delivery_key("a\x1fb", "c", "d")
    with pytest.raises(errors.ValidationFailed):
        delivery_key("", "r", "d")
    with pytest.raises(errors.ValidationFailed):
        delivery_key("e", "r", "")


# --- a model of one delivery under senders, crashes and the reaper --------------------------


@settings(max_examples=300, deadline=None)
@given(
    steps=st.lists(
        st.tuples(
            st.sampled_from(["lease", "succeed", "fail", "429", "410", "expire", "retry", "stale"]),
            st.floats(0, 1, exclude_max=True),
        ),
        max_size=40,
    )
)
def test_model_one_lease_at_a_time_and_sent_once(steps: list[tuple[str, float]]) -> None:
    schedule = RetrySchedule((0.0, 1.0, 2.0, 3.0))
    v = view()
    now = NOW
    tokens = 0
    holders: list[Fence] = []  # every fence ever handed out
    sends = 0
    for op, rand in steps:
        now += timedelta(seconds=5)
        if op == "lease":
            if v.state is S.DUE and v.available_at <= now:
                tokens += 1
                d = decide_lease(
                    v,
                    now=now,
                    lease=LeasePolicy(lease_s=60),
                    new_lease_token=f"t{tokens}",
                    destination_enabled=True,
                )
                assert isinstance(d, LeaseDecision) and d.attempt == v.attempt + 1
                v = apply(v, d)
                holders.append(Fence("d1", v.attempt, f"t{tokens}"))
        elif op in ("succeed", "fail", "429", "410", "stale"):
            if not holders:
                continue
            fence = holders[-1] if op != "stale" else holders[0]
            result = {
                "succeed": SendResult(E.SUCCEED, 200),
                "stale": SendResult(E.SUCCEED, 200),
                "fail": SendResult(E.FAIL, 500),
                "429": SendResult(E.RATE_LIMITED, 429, retry_after_s=7.0),
                "410": SendResult(E.GONE, 410),
            }[op]
            current = v.state is S.IN_FLIGHT and fence.attempt == v.attempt
            try:
                d2 = decide_outcome(v, fence, result, now=now, schedule=schedule, rand=rand)
            except errors.LeaseLost:
                assert not current
                continue
            assert current
            if d2.state is S.SENT:
                sends += 1
            if result.event is E.RATE_LIMITED and d2.state is S.DUE:
                assert d2.available_at >= now + timedelta(seconds=7)
            v = apply(v, d2)
        elif op == "expire":
            d3 = decide_expire(v, now=now + timedelta(seconds=60), schedule=schedule, rand=rand)
            if d3 is not None:
                v = apply(v, d3)
        elif op == "retry" and v.state in (S.FAILED, S.DISABLED):
            v = apply(v, decide_retry(v, now=now))
        assert v.attempt == len(holders)
        assert (v.state is S.IN_FLIGHT) == (v.lease_expires_at is not None)
    assert sends <= 1
    assert (sends == 1) == (v.state is S.SENT)


def test_the_docs_draw_the_table() -> None:
    doc = Path(__file__).resolve().parents[2] / "docs" / "architecture" / "alerting.md"
    assert "```mermaid\n" + mermaid_diagram() + "\n```" in doc.read_text()
