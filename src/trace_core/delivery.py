"""The alert delivery state machine: one webhook delivery, its attempts, leases and retries.

Theory of operation
-------------------
A *delivery* is one alert event routed to one destination (a row of ``alert_deliveries``). Its
*key* is derived from (alert event key, route, destination), so routing the same event twice
yields the same delivery, and its *webhook id* is derived from the key, so every attempt of the
delivery carries the same ``webhook-id`` and a receiver can drop duplicates.

A Delivery Service process *leases* a due delivery (a new attempt with a fresh random lease
token), sends it, and reports what happened. As with tasks (``trace_core.lifecycle``), the
triple ``(delivery_id, attempt, lease_token)`` is the *fence*: an outcome is applied only for
the delivery's current attempt with its token, as a compare-and-swap.

States (the values ``alert_deliveries.state`` stores)::

                    ┌──────────────── retry (operator) ────────────────┐
                    ▼                                                  │
    [route] ──▶ due ──lease──▶ in_flight ──succeed──▶ sent             │
      │          ▲                │  │  └──gone (410)──▶ disabled ─────┤
      │          └─ fail / rate_limited / expire ─┘  └──refuse / (no attempts left)──▶ failed
      └── (older than max_delivery_age) ──▶ suppressed ── retry (operator) ──▶ due

Invariants this module keeps (the unit and hypothesis tests check them):

1. The attempt number only grows, and only on ``lease``; a lease always mints a new token.
2. An outcome is applied only for the current attempt, with its token, while ``in_flight``:
   a sender whose lease expired (and whose delivery was leased again) never writes.
3. ``sent`` is final. A delivery is never sent twice by this machine: at most one lease is
   current at a time. (A crashed sender may have delivered before the lease expired; the
   retry carries the same webhook id, so the receiver can tell.)
4. Retries follow the schedule (``docs/standards/operations.md``, "webhook delivery") with
   full jitter; a ``429`` waits at least its ``Retry-After``; a ``410 Gone`` disables the
   destination; after the last attempt the delivery is ``failed``.
5. An expired lease counts as an attempt whose outcome is unknown: the delivery is due again
   (after the schedule's delay) or failed when no attempts are left.

Nothing here performs I/O or reads the clock: callers pass ``now`` and a random number in
[0, 1) for jitter, and apply the returned decision.
"""

from __future__ import annotations

import email.utils
import enum
import hashlib
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Final, assert_never

import attrs

from trace_core import errors
from trace_core._diagram import state_diagram


class DeliveryState(enum.StrEnum):
    """A delivery's state, stored as ``alert_deliveries.state``."""

    DUE = "due"
    IN_FLIGHT = "in_flight"
    SENT = "sent"
    FAILED = "failed"
    SUPPRESSED = "suppressed"
    DISABLED = "disabled"


class DeliveryEvent(enum.StrEnum):
    """What can happen to a delivery: the inputs of the state machine."""

    LEASE = "lease"  # a Delivery Service process starts an attempt
    SUCCEED = "succeed"  # the receiver answered 2xx
    FAIL = "fail"  # 5xx, another non-2xx, timeout, connection error: retry on the schedule
    RATE_LIMITED = "rate_limited"  # 429: retry no sooner than Retry-After
    GONE = "gone"  # 410 Gone: the destination is disabled
    REFUSE = "refuse"  # the destination cannot be sent to (unsafe address, bad URL): no retry
    EXPIRE = "expire"  # the attempt's lease lapsed (its sender crashed or hung)
    DISABLE = "disable"  # the destination is disabled (by an operator or a 410)
    RETRY = "retry"  # an operator asks for another try of a finished delivery


#: States no event of the Delivery Service leaves (only an operator's ``retry``).
SETTLED_STATES: Final = frozenset(
    {
        DeliveryState.SENT,
        DeliveryState.FAILED,
        DeliveryState.SUPPRESSED,
        DeliveryState.DISABLED,
    }
)

_RETRY_OR_FAIL: Final = (DeliveryState.DUE, DeliveryState.FAILED)

#: The transition table: ``(state, event) -> target`` or ``(target if attempts left, else)``.
#: Pairs not in the table are illegal (``Conflict``).
TRANSITIONS: Final[
    Mapping[
        tuple[DeliveryState, DeliveryEvent], DeliveryState | tuple[DeliveryState, DeliveryState]
    ]
] = {
    (DeliveryState.DUE, DeliveryEvent.LEASE): DeliveryState.IN_FLIGHT,
    (DeliveryState.DUE, DeliveryEvent.DISABLE): DeliveryState.DISABLED,
    (DeliveryState.IN_FLIGHT, DeliveryEvent.SUCCEED): DeliveryState.SENT,
    (DeliveryState.IN_FLIGHT, DeliveryEvent.FAIL): _RETRY_OR_FAIL,
    (DeliveryState.IN_FLIGHT, DeliveryEvent.RATE_LIMITED): _RETRY_OR_FAIL,
    (DeliveryState.IN_FLIGHT, DeliveryEvent.EXPIRE): _RETRY_OR_FAIL,
    (DeliveryState.IN_FLIGHT, DeliveryEvent.GONE): DeliveryState.DISABLED,
    (DeliveryState.IN_FLIGHT, DeliveryEvent.REFUSE): DeliveryState.FAILED,
    (DeliveryState.FAILED, DeliveryEvent.RETRY): DeliveryState.DUE,
    (DeliveryState.DISABLED, DeliveryEvent.RETRY): DeliveryState.DUE,
    (DeliveryState.SUPPRESSED, DeliveryEvent.RETRY): DeliveryState.DUE,
}


def target_state(
    state: DeliveryState, event: DeliveryEvent, *, attempts_left: bool
) -> DeliveryState:
    """The state ``event`` moves a delivery in ``state`` to. Raises ``Conflict`` for a pair
    that is not in the table."""
    target = TRANSITIONS.get((state, event))
    if target is None:
        raise errors.Conflict(f"{event.value} is not allowed for a delivery in state {state.value}")
    if isinstance(target, tuple):
        return target[0] if attempts_left else target[1]
    return target


# ---------------------------------------------------------------------------------------------
# Policies


#: The default schedule: the delay before attempt ``n`` (1-based) is ``DEFAULT_SCHEDULE[n-1]``
#: seconds after the previous attempt failed (``docs/standards/operations.md``).
DEFAULT_SCHEDULE: Final[tuple[float, ...]] = (
    0.0,
    5.0,
    5 * 60.0,
    30 * 60.0,
    2 * 3600.0,
    5 * 3600.0,
    10 * 3600.0,
    14 * 3600.0,
    20 * 3600.0,
    24 * 3600.0,
)

#: The longest ``Retry-After`` honoured; a receiver asking for more waits this long.
MAX_RETRY_AFTER_S: Final = 24 * 3600.0


@attrs.frozen
class RetrySchedule:
    """When to try again: attempt ``n`` runs ``delays_s[n-1]`` seconds (with full jitter: a
    uniform fraction of it) after attempt ``n-1`` failed; ``len(delays_s)`` attempts in all.
    Tests pass a compressed schedule through configuration."""

    delays_s: tuple[float, ...] = DEFAULT_SCHEDULE

    def __attrs_post_init__(self) -> None:
        if not self.delays_s or any(d < 0 for d in self.delays_s):
            raise errors.ValidationFailed(
                "a retry schedule is one or more non-negative delays", field="retry_schedule"
            )

    @property
    def max_attempts(self) -> int:
        return len(self.delays_s)

    def delay(self, failed_attempt: int, rand: float) -> timedelta:
        """Wait after attempt ``failed_attempt`` failed; ``rand`` is uniform in [0, 1)."""
        index = min(max(failed_attempt, 1), len(self.delays_s) - 1)
        return timedelta(seconds=self.delays_s[index] * rand)


@attrs.frozen
class LeasePolicy:
    """How long an attempt holds its delivery: the send timeout plus a margin, so a live
    sender always reports before its lease lapses."""

    lease_s: float = 60.0
    #: The HTTP timeout of one send (``docs/standards/operations.md``: 15 s).
    timeout_s: float = 15.0

    def expires(self, now: datetime) -> datetime:
        return now + timedelta(seconds=self.lease_s)


# ---------------------------------------------------------------------------------------------
# Keys


def delivery_key(alert_key: str, route: str, destination_id: str) -> str:
    """The idempotency key of routing alert event ``alert_key`` by ``route`` to
    ``destination_id``: the same three always give the same 64 hex digits."""
    for name, value in (("alert_key", alert_key), ("route", route)):
        if not value:
            raise errors.ValidationFailed(f"{name} must not be empty", field=name)
    if not destination_id:
        raise errors.ValidationFailed("destination_id must not be empty", field="destination_id")
    digest = hashlib.sha256(b"trace.delivery.v1")
    for part in (alert_key, route, destination_id):  # length-prefixed: no two splits collide
        data = part.encode()
        digest.update(len(data).to_bytes(4, "big") + data)
    return digest.hexdigest()


def webhook_id(key: str) -> str:
    """The ``webhook-id`` header of every attempt of the delivery with ``key``."""
    return f"msg_{key[:32]}"


# ---------------------------------------------------------------------------------------------
# Views and decisions


@attrs.frozen
class DeliveryView:
    """What the state machine needs to know about a delivery (a row of ``alert_deliveries``)."""

    delivery_id: str
    state: DeliveryState
    #: The current attempt number; 0 before the first lease.
    attempt: int
    lease_token: str | None
    lease_expires_at: datetime | None
    #: When the delivery is (or becomes) due.
    available_at: datetime


@attrs.frozen
class Fence:
    """The fence an attempt's outcome presents."""

    delivery_id: str
    attempt: int
    lease_token: str


def decide_create(
    *, event_time: datetime, now: datetime, max_delivery_age: timedelta | None
) -> tuple[DeliveryState, str | None]:
    """The state a routed delivery starts in, and the reason when it is suppressed: an alert
    whose ``event_time`` is older than ``max_delivery_age`` is recorded, never sent."""
    if max_delivery_age is not None and now - event_time > max_delivery_age:
        age = int((now - event_time).total_seconds())
        limit = int(max_delivery_age.total_seconds())
        return DeliveryState.SUPPRESSED, f"event is {age} s old; max_delivery_age is {limit} s"
    return DeliveryState.DUE, None


@attrs.frozen
class LeaseDecision:
    """A new attempt: the delivery is ``in_flight`` under it."""

    attempt: int
    lease_token: str
    lease_expires_at: datetime
    state: DeliveryState = DeliveryState.IN_FLIGHT


@attrs.frozen
class SettleDecision:
    """The next row after an event that ends an attempt or moves a delivery by hand."""

    event: DeliveryEvent
    state: DeliveryState
    available_at: datetime
    #: The delivery's ``last_error`` (``None`` for a success or an operator's move).
    error: str | None = None
    #: The destination must be disabled too (a ``410 Gone``).
    disable_destination: bool = False
    #: The attempt's lease ends with this decision.
    lease_expires_at: None = None


def decide_lease(
    view: DeliveryView,
    *,
    now: datetime,
    lease: LeasePolicy,
    new_lease_token: str,
    destination_enabled: bool,
) -> LeaseDecision | SettleDecision:
    """Start an attempt of a due delivery; a delivery whose destination was disabled becomes
    ``disabled`` instead (no attempt). Raises ``Conflict`` if it is not due yet or not
    ``due``."""
    if view.state is not DeliveryState.DUE or view.available_at > now:
        raise errors.Conflict(
            f"delivery is {view.state.value}, not due", details={"state": view.state.value}
        )
    if not destination_enabled:
        return _disabled(view)
    target_state(view.state, DeliveryEvent.LEASE, attempts_left=True)
    return LeaseDecision(
        attempt=view.attempt + 1,
        lease_token=new_lease_token,
        lease_expires_at=lease.expires(now),
    )


def check_fence(view: DeliveryView, fence: Fence) -> None:
    """Check that ``fence`` names the current, still in-flight attempt. Raises ``LeaseLost``."""
    if fence.delivery_id != view.delivery_id or fence.attempt != view.attempt:
        raise errors.LeaseLost(
            "a newer attempt started" if fence.attempt < view.attempt else "no such attempt",
            details={"current_attempt": view.attempt},
        )
    if view.lease_token is None or fence.lease_token != view.lease_token:
        raise errors.LeaseLost("lease token does not match the current attempt")
    if view.state is not DeliveryState.IN_FLIGHT:
        raise errors.LeaseLost(
            f"the attempt no longer holds the delivery (it is {view.state.value})",
            details={"state": view.state.value},
        )


@attrs.frozen
class SendResult:
    """What one send produced, as the sender saw it."""

    event: DeliveryEvent
    #: The HTTP status, ``None`` when no response came.
    status_code: int | None = None
    #: Seconds the receiver asked to wait (a ``429``'s ``Retry-After``).
    retry_after_s: float | None = None
    #: What went wrong, for ``last_error`` and the attempt row.
    error: str | None = None


def parse_retry_after(value: str | None, *, now: datetime) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date), capped at
    ``MAX_RETRY_AFTER_S``; ``None`` when absent or unreadable."""
    if value is None:
        return None
    text = value.strip()
    if text.isdigit():
        return min(float(text), MAX_RETRY_AFTER_S)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return min(max((when - now).total_seconds(), 0.0), MAX_RETRY_AFTER_S)


def classify_response(status: int, *, retry_after: str | None, now: datetime) -> SendResult:
    """The event an HTTP answer is: 2xx success, 410 gone, 429 rate limited, anything else
    (including a redirect, which is never followed) a retryable failure."""
    if 200 <= status < 300:
        return SendResult(DeliveryEvent.SUCCEED, status_code=status)
    if status == 410:
        return SendResult(DeliveryEvent.GONE, status_code=status, error="410 Gone")
    if status == 429:
        return SendResult(
            DeliveryEvent.RATE_LIMITED,
            status_code=status,
            retry_after_s=parse_retry_after(retry_after, now=now),
            error="429 Too Many Requests",
        )
    return SendResult(DeliveryEvent.FAIL, status_code=status, error=f"HTTP {status}")


def decide_outcome(
    view: DeliveryView,
    fence: Fence,
    result: SendResult,
    *,
    now: datetime,
    schedule: RetrySchedule,
    rand: float,
) -> SettleDecision:
    """Apply the result of the current attempt. Raises ``LeaseLost`` (``check_fence``),
    ``Conflict`` for an event that is not a send result."""
    check_fence(view, fence)
    attempts_left = view.attempt < schedule.max_attempts
    event = result.event
    match event:
        case DeliveryEvent.SUCCEED | DeliveryEvent.GONE | DeliveryEvent.REFUSE:
            state = target_state(view.state, event, attempts_left=attempts_left)
            return SettleDecision(
                event=event,
                state=state,
                available_at=view.available_at,
                error=result.error,
                disable_destination=event is DeliveryEvent.GONE,
            )
        case DeliveryEvent.FAIL | DeliveryEvent.RATE_LIMITED:
            state = target_state(view.state, event, attempts_left=attempts_left)
            wait = schedule.delay(view.attempt, rand)
            if result.retry_after_s is not None:
                wait = max(wait, timedelta(seconds=result.retry_after_s))
            return SettleDecision(
                event=event,
                state=state,
                available_at=now + wait if state is DeliveryState.DUE else view.available_at,
                error=result.error,
            )
        case (
            DeliveryEvent.LEASE | DeliveryEvent.EXPIRE | DeliveryEvent.DISABLE | DeliveryEvent.RETRY
        ):
            raise errors.Conflict(f"{event.value} is not the result of a send")
        case _:
            assert_never(event)


def decide_expire(
    view: DeliveryView, *, now: datetime, schedule: RetrySchedule, rand: float
) -> SettleDecision | None:
    """The reaper's decision for an in-flight delivery; ``None`` while its lease holds."""
    if view.state is not DeliveryState.IN_FLIGHT or view.lease_expires_at is None:
        return None
    if view.lease_expires_at > now:
        return None
    attempts_left = view.attempt < schedule.max_attempts
    state = target_state(view.state, DeliveryEvent.EXPIRE, attempts_left=attempts_left)
    return SettleDecision(
        event=DeliveryEvent.EXPIRE,
        state=state,
        available_at=(
            now + schedule.delay(view.attempt, rand)
            if state is DeliveryState.DUE
            else view.available_at
        ),
        error=f"attempt {view.attempt}'s lease expired (outcome unknown)",
    )


def decide_retry(view: DeliveryView, *, now: datetime) -> SettleDecision:
    """An operator's retry of a failed, disabled or suppressed delivery: due at once. The next
    attempt numbers on from the last one. Raises ``Conflict`` for any other state."""
    state = target_state(view.state, DeliveryEvent.RETRY, attempts_left=True)
    return SettleDecision(event=DeliveryEvent.RETRY, state=state, available_at=now)


def decide_disable(view: DeliveryView) -> SettleDecision | None:
    """A due delivery of a destination being disabled becomes ``disabled``; ``None`` for any
    other state (in-flight attempts finish; settled deliveries stay as they are)."""
    if view.state is not DeliveryState.DUE:
        return None
    return _disabled(view)


def _disabled(view: DeliveryView) -> SettleDecision:
    """A due delivery of a disabled destination settles as ``disabled`` (no attempt)."""
    state = target_state(view.state, DeliveryEvent.DISABLE, attempts_left=False)
    return SettleDecision(
        event=DeliveryEvent.DISABLE,
        state=state,
        available_at=view.available_at,
        error="the destination is disabled",
    )


Decision = LeaseDecision | SettleDecision


def apply(view: DeliveryView, decision: Decision) -> DeliveryView:
    """The delivery as it is after ``decision``: exactly the columns the store writes."""
    match decision:
        case LeaseDecision():
            return attrs.evolve(
                view,
                state=decision.state,
                attempt=decision.attempt,
                lease_token=decision.lease_token,
                lease_expires_at=decision.lease_expires_at,
            )
        case SettleDecision():
            return attrs.evolve(
                view,
                state=decision.state,
                available_at=decision.available_at,
                lease_expires_at=None,
            )
        case _:
            assert_never(decision)


def schedule_from(values: Sequence[float]) -> RetrySchedule:
    """A schedule from configuration. Raises ``ValidationFailed``."""
    return RetrySchedule(tuple(float(v) for v in values))


def mermaid_diagram() -> str:
    """The state diagram in Mermaid syntax, drawn from ``TRANSITIONS``."""
    return state_diagram(TRANSITIONS, initial=["due", "suppressed"], final=["sent"])


__all__ = [
    "DEFAULT_SCHEDULE",
    "MAX_RETRY_AFTER_S",
    "SETTLED_STATES",
    "TRANSITIONS",
    "Decision",
    "DeliveryEvent",
    "DeliveryState",
    "DeliveryView",
    "Fence",
    "LeaseDecision",
    "LeasePolicy",
    "RetrySchedule",
    "SendResult",
    "SettleDecision",
    "apply",
    "check_fence",
    "classify_response",
    "decide_create",
    "decide_disable",
    "decide_expire",
    "decide_lease",
    "decide_outcome",
    "decide_retry",
    "delivery_key",
    "mermaid_diagram",
    "parse_retry_after",
    "schedule_from",
    "target_state",
    "webhook_id",
]
