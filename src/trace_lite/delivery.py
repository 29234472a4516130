"""The alert delivery store on Postgres: the shared ``alert_deliveries`` table, leases and
attempts (destinations: ``trace_lite.delivery_destinations``, which ``DeliveryStore`` extends).

Every move is decided by ``trace_core.delivery`` at the database's ``now()`` and written by
one statement of ``sql/delivery.sql`` as a compare-and-swap on the fence columns, so any number
of Delivery Service processes can lease from the one table (``FOR UPDATE SKIP LOCKED``) and a
sender whose lease lapsed never overwrites the attempt that followed it (``LeaseLost``).
Every attempt gets a ``delivery_attempts`` row: who sent it, when, how it ended, the status
code, the latency and the error.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, NamedTuple

import attrs
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from trace_core import delivery as kernel
from trace_core import errors
from trace_core.alert_rules import Planned
from trace_core.delivery import DeliveryState, DeliveryView, Fence, SendResult
from trace_lite import sqlfile
from trace_lite.delivery_destinations import KINDS, DestinationRow, DestinationStore
from trace_lite.pg import fetch_named, transaction

Q = sqlfile.load("delivery.sql")


class _DueRow(NamedTuple):
    delivery_id: str
    state: str
    attempt: int
    lease_token: str | None
    lease_expires_at: datetime | None
    available_at: datetime
    delivery_key: str
    org_id: str
    destination_id: str
    route: str
    alert_key: str
    event_time: datetime
    payload: dict[str, Any]
    kind: str
    url: str
    secret_name: str
    enabled: bool
    now: datetime


class _LockedRow(NamedTuple):
    delivery_id: str
    state: str
    attempt: int
    lease_token: str | None
    lease_expires_at: datetime | None
    available_at: datetime
    destination_id: str
    now: datetime


class _ExpiredRow(NamedTuple):
    delivery_id: str
    state: str
    attempt: int
    lease_token: str | None
    lease_expires_at: datetime | None
    available_at: datetime
    now: datetime


class DeliveryRow(NamedTuple):
    """A delivery as ``trace alerts deliveries`` lists it."""

    delivery_id: str
    state: str
    attempt: int
    route: str
    alert_key: str
    event_time: datetime
    available_at: datetime
    last_error: str | None
    last_status: int | None
    suppressed_reason: str | None
    created_at: datetime
    sent_at: datetime | None
    destination: str


class AttemptRow(NamedTuple):
    attempt: int
    sender: str
    started_at: datetime
    finished_at: datetime | None
    outcome: str
    status_code: int | None
    latency_ms: int | None
    error: str | None


class _NowRow(NamedTuple):
    now: datetime


class _KeyRow(NamedTuple):
    delivery_id: str
    state: str


class _TaskScope(NamedTuple):
    org_id: str
    running: bool


class _KeyStateRow(NamedTuple):
    delivery_key: str
    state: str


class _CountRow(NamedTuple):
    state: str
    n: int
    oldest_s: float


def _view(row: _DueRow | _LockedRow | _ExpiredRow) -> DeliveryView:
    return DeliveryView(
        delivery_id=row.delivery_id,
        state=DeliveryState(row.state),
        attempt=row.attempt,
        lease_token=row.lease_token,
        lease_expires_at=row.lease_expires_at,
        available_at=row.available_at,
    )


@attrs.frozen
class Leased:
    """One leased delivery: what the sender needs to send it and report back."""

    fence: Fence
    delivery_key: str
    org_id: str
    destination_id: str
    kind: str
    url: str
    secret_name: str
    route: str
    alert_key: str
    event_time: datetime
    payload: Mapping[str, Any]
    lease_expires_at: datetime


@attrs.frozen
class Outcome:
    """What one attempt's send came to, for ``record_many``."""

    fence: Fence
    result: SendResult
    latency_ms: int | None


@attrs.frozen
class Counts:
    """Deliveries per state and the age of the oldest due one (metrics)."""

    by_state: Mapping[str, int]
    oldest_due_s: float


class DeliveryStore(DestinationStore):
    """Deliveries (and, inherited, destinations) on the Postgres state database."""

    def __init__(
        self,
        pool: AsyncConnectionPool,
        *,
        schedule: kernel.RetrySchedule | None = None,
        lease: kernel.LeasePolicy | None = None,
        rand: Callable[[], float] = random.random,
    ) -> None:
        super().__init__(pool)
        self.schedule = schedule or kernel.RetrySchedule()
        self.lease_policy = lease or kernel.LeasePolicy()
        self._rand = rand

    # --- deliveries ---------------------------------------------------------------------------

    async def enqueue(
        self,
        *,
        org_id: str,
        destination_id: str,
        alert_key: str,
        route: str,
        event_time: datetime,
        payload: Mapping[str, Any],
        max_delivery_age: timedelta | None = None,
    ) -> tuple[str, DeliveryState]:
        """Record the delivery of one alert event by ``route`` to one destination: ``due``, or
        ``suppressed`` (with the reason) when older than ``max_delivery_age``. Routing the same
        event again returns the delivery recorded first. Returns ``(delivery_id, state)``."""
        key = kernel.delivery_key(alert_key, route, destination_id)
        async with transaction(self.pool) as cur:
            (clock,) = await fetch_named(cur, _NowRow, Q["db_now"], {})
            state, reason = kernel.decide_create(
                event_time=event_time, now=clock.now, max_delivery_age=max_delivery_age
            )
            await cur.execute(
                Q["insert_delivery"],
                {
                    "delivery_id": str(uuid.uuid4()),
                    "org_id": org_id,
                    "destination_id": destination_id,
                    "delivery_key": key,
                    "alert_key": alert_key,
                    "route": route,
                    "event_time": event_time,
                    "payload": Jsonb(dict(payload)),
                    "state": state.value,
                    "suppressed_reason": reason,
                },
            )
            (found,) = await fetch_named(cur, _KeyRow, Q["delivery_by_key"], {"delivery_key": key})
        return found.delivery_id, DeliveryState(found.state)

    async def record_planned(
        self, task_id: str, attempt: int, planned: Sequence[Planned]
    ) -> list[str]:
        """Record the deliveries an ``alert_route`` attempt planned (``trace_sdk.alerts``), in
        one transaction: destinations are resolved by name in the task's org, each delivery is
        ``due`` or ``suppressed`` (``decide_create`` at the database's clock) and stored once
        under its delivery key. Returns each delivery's state, in order.

        Raises ``LeaseLost`` when ``attempt`` is not the task's running one (nothing is
        written), ``NotFound`` for an unknown task or a destination the org does not have.
        """
        if not planned:
            return []
        async with transaction(self.pool) as cur:
            scopes = await fetch_named(
                cur, _TaskScope, Q["task_scope"], {"task_id": task_id, "attempt": attempt}
            )
            if not scopes:
                raise errors.NotFound("no such task")
            if not scopes[0].running:
                raise errors.LeaseLost("the attempt is not the task's running one")
            org_id = scopes[0].org_id
            names = sorted({p.destination for p in planned})
            found = await fetch_named(
                cur,
                DestinationRow,
                Q["destinations_by_names"],
                {"org_id": org_id, "names": names},
            )
            ids = {d.name: d.destination_id for d in found}
            missing = [n for n in names if n not in ids]
            if missing:
                raise errors.NotFound(
                    f"no alert destination {missing[0]!r} in the task's org", field="routes"
                )
            (clock,) = await fetch_named(cur, _NowRow, Q["db_now"], {})
            keys: list[str] = []
            params: list[dict[str, Any]] = []
            for p in planned:
                destination_id = ids[p.destination]
                key = kernel.delivery_key(p.alert_key, p.route, destination_id)
                state, reason = kernel.decide_create(
                    event_time=p.event_time, now=clock.now, max_delivery_age=p.max_delivery_age
                )
                keys.append(key)
                params.append(
                    {
                        "delivery_id": str(uuid.uuid4()),
                        "org_id": org_id,
                        "destination_id": destination_id,
                        "delivery_key": key,
                        "alert_key": p.alert_key,
                        "route": p.route,
                        "event_time": p.event_time,
                        "payload": Jsonb(dict(p.payload)),
                        "state": state.value,
                        "suppressed_reason": reason,
                    }
                )
            await cur.executemany(Q["insert_delivery"], params)
            rows = await fetch_named(cur, _KeyStateRow, Q["deliveries_by_keys"], {"keys": keys})
        states = {r.delivery_key: r.state for r in rows}
        return [states[k] for k in keys]

    async def lease(self, n: int, *, sender: str) -> list[Leased]:
        """Lease up to ``n`` due deliveries to ``sender`` (skipping rows other senders hold);
        due deliveries of a disabled destination become ``disabled`` instead."""
        leased: list[Leased] = []
        starts: list[dict[str, Any]] = []
        async with transaction(self.pool) as cur:
            rows = await fetch_named(cur, _DueRow, Q["lock_due"], {"n": n})
            for row in rows:
                decision = kernel.decide_lease(
                    _view(row),
                    now=row.now,
                    lease=self.lease_policy,
                    new_lease_token=str(uuid.uuid4()),
                    destination_enabled=row.enabled,
                )
                if isinstance(decision, kernel.SettleDecision):
                    await self._move(cur, _view(row), decision)
                    continue
                starts.append(
                    {
                        "delivery_id": row.delivery_id,
                        "attempt": decision.attempt,
                        "lease_token": decision.lease_token,
                        "lease_expires_at": decision.lease_expires_at,
                        "sender": sender,
                    }
                )
                leased.append(
                    Leased(
                        fence=Fence(row.delivery_id, decision.attempt, decision.lease_token),
                        delivery_key=row.delivery_key,
                        org_id=row.org_id,
                        destination_id=row.destination_id,
                        kind=row.kind,
                        url=row.url,
                        secret_name=row.secret_name,
                        route=row.route,
                        alert_key=row.alert_key,
                        event_time=row.event_time,
                        payload=row.payload,
                        lease_expires_at=decision.lease_expires_at,
                    )
                )
            if starts:  # the attempts start together (one round trip each statement)
                await cur.executemany(Q["apply_lease"], starts)
                if cur.rowcount != len(starts):  # we hold the row locks: decisions saw them
                    raise errors.Conflict("a delivery moved during its lease")
                await cur.executemany(Q["insert_attempt"], starts)
        return leased

    async def record(self, fence: Fence, result: SendResult, *, latency_ms: int) -> DeliveryState:
        """Apply the result of the attempt ``fence`` names and record the attempt. A ``410``
        also disables the destination and its due deliveries. Returns the delivery's new state.

        Raises ``LeaseLost`` when the attempt no longer holds the delivery (its lease expired
        and the reaper moved it, or a newer attempt started): nothing is written, and the
        reaper's record of the attempt (``expire``) stands.
        """
        async with transaction(self.pool) as cur:
            return await self._record(cur, Outcome(fence, result, latency_ms))

    async def record_many(self, outcomes: Sequence[Outcome]) -> list[DeliveryState | None]:
        """``record`` for each of ``outcomes`` in one transaction (one commit for a Delivery
        Service pass), rows locked in delivery-id order. Returns each one's new state, or
        ``None`` where ``record`` would raise ``LeaseLost`` or ``NotFound``: nothing is written
        for that one, the others are recorded."""
        states: dict[int, DeliveryState | None] = {}
        order = sorted(range(len(outcomes)), key=lambda i: outcomes[i].fence.delivery_id)
        async with transaction(self.pool) as cur:
            for i in order:
                try:
                    states[i] = await self._record(cur, outcomes[i])
                except (errors.LeaseLost, errors.NotFound):
                    states[i] = None  # checked before any write of this outcome
        return [states[i] for i in range(len(outcomes))]

    async def _record(self, cur: Any, outcome: Outcome) -> DeliveryState:
        fence, result = outcome.fence, outcome.result
        rows = await fetch_named(
            cur, _LockedRow, Q["lock_delivery"], {"delivery_id": fence.delivery_id}
        )
        if not rows:
            raise errors.NotFound("no such delivery")
        row = rows[0]
        decision = kernel.decide_outcome(
            _view(row),
            fence,
            result,
            now=row.now,
            schedule=self.schedule,
            rand=self._rand(),
        )
        await cur.execute(
            Q["apply_outcome"],
            {
                "delivery_id": fence.delivery_id,
                "attempt": fence.attempt,
                "lease_token": fence.lease_token,
                "state": decision.state.value,
                "available_at": decision.available_at,
                "error": decision.error,
                "status_code": result.status_code,
            },
        )
        if cur.rowcount != 1:
            raise errors.LeaseLost("the attempt no longer holds the delivery")
        await self._finish_attempt(cur, fence, result, outcome.latency_ms)
        if decision.disable_destination:
            reason = f"{result.error or 'disabled'} from the receiver"
            await cur.execute(
                Q["set_destination_enabled"],
                {"destination_id": row.destination_id, "enabled": False, "reason": reason},
            )
            await cur.execute(
                Q["disable_due_of_destination"],
                {"destination_id": row.destination_id, "reason": reason},
            )
        return decision.state

    async def _finish_attempt(
        self, cur: Any, fence: Fence, result: SendResult, latency_ms: int | None
    ) -> None:
        await cur.execute(
            Q["finish_attempt"],
            {
                "delivery_id": fence.delivery_id,
                "attempt": fence.attempt,
                "outcome": result.event.value,
                "status_code": result.status_code,
                "latency_ms": latency_ms,
                "error": result.error,
            },
        )

    async def _move(self, cur: Any, view: DeliveryView, decision: kernel.SettleDecision) -> None:
        await cur.execute(
            Q["apply_move"],
            {
                "delivery_id": view.delivery_id,
                "attempt": view.attempt,
                "from_state": view.state.value,
                "state": decision.state.value,
                "available_at": decision.available_at,
                "error": decision.error,
            },
        )
        if cur.rowcount != 1:
            raise errors.Conflict("the delivery moved meanwhile")

    async def reap(self, n: int = 100) -> int:
        """Expire in-flight deliveries whose lease lapsed (``decide_expire``): due again on the
        schedule, or failed with no attempts left; their attempt ends as ``expire``. Returns how
        many were expired."""
        async with transaction(self.pool) as cur:
            rows = await fetch_named(cur, _ExpiredRow, Q["lock_expired"], {"n": n})
            for row in rows:
                view = _view(row)
                decision = kernel.decide_expire(
                    view, now=row.now, schedule=self.schedule, rand=self._rand()
                )
                if decision is None:
                    continue
                await self._move(cur, view, decision)
                if view.lease_token is not None:
                    fence = Fence(view.delivery_id, view.attempt, view.lease_token)
                    result = SendResult(kernel.DeliveryEvent.EXPIRE, error=decision.error)
                    await self._finish_attempt(cur, fence, result, None)
        return len(rows)

    async def retry(self, delivery_id: str) -> DeliveryState:
        """An operator's retry of a failed, disabled or suppressed delivery: due now. Raises
        ``NotFound``, ``Conflict`` (``decide_retry``)."""
        async with transaction(self.pool) as cur:
            rows = await fetch_named(
                cur, _LockedRow, Q["lock_delivery"], {"delivery_id": delivery_id}
            )
            if not rows:
                raise errors.NotFound("no such delivery")
            view = _view(rows[0])
            decision = kernel.decide_retry(view, now=rows[0].now)
            await self._move(cur, view, decision)
        return decision.state

    async def counts(self) -> Counts:
        async with transaction(self.pool) as cur:
            rows = await fetch_named(cur, _CountRow, Q["delivery_counts"], {})
        by_state = {s.value: 0 for s in DeliveryState}
        oldest = 0.0
        for row in rows:
            by_state[row.state] = row.n
            if row.state == DeliveryState.DUE.value:
                oldest = float(row.oldest_s)
        return Counts(by_state=by_state, oldest_due_s=oldest)

    async def deliveries(
        self, org_id: str, *, state: str | None = None, limit: int = 100
    ) -> list[DeliveryRow]:
        if state is not None and state not in {s.value for s in DeliveryState}:
            raise errors.ValidationFailed(f"no such delivery state {state!r}", field="state")
        async with transaction(self.pool) as cur:
            return await fetch_named(
                cur,
                DeliveryRow,
                Q["list_deliveries"],
                {"org_id": org_id, "state": state, "limit": limit},
            )

    async def attempts(self, delivery_id: str) -> list[AttemptRow]:
        async with transaction(self.pool) as cur:
            return await fetch_named(
                cur, AttemptRow, Q["delivery_attempts"], {"delivery_id": delivery_id}
            )


__all__ = [
    "KINDS",
    "AttemptRow",
    "Counts",
    "DeliveryRow",
    "DeliveryStore",
    "DestinationRow",
    "Leased",
    "Outcome",
]
