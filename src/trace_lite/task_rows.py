"""The task queries (``sql/tasks.sql``) and the rows they return, read by name.

Every row class here is a ``typing.NamedTuple`` whose fields are exactly one query's columns:
``fetch`` (``pg.fetch_named``) matches them by name once per result and refuses a mismatch, so
reordering or renaming a ``SELECT`` column cannot shift a value into the wrong field, and a row
costs one tuple. ``uuid`` columns (the ``task_heads`` view, migration 0010, keeps ids as
``uuid`` so filters use the primary key) are read as their canonical text.

Also here: what several task modules share -- locking a task (``lock_task``), reading one
(``task_row``), announcing queued tasks (``wake``), recording an attempt's events
(``insert_events``) -- and how a JSON value stored in a task is read back (``stored_json``): parsed and held to the JSON limits, so a
value written around the API (nested 900 levels, ...) is reported, never served.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Literal, NamedTuple, TypeVar

import psycopg
from psycopg.types.json import Jsonb

from trace_core import errors, json_limits, wire
from trace_core.lifecycle import AttemptOutcome, Fence, TaskState, TaskView
from trace_lite import sqlfile
from trace_lite.pg import fetch_named

Q = sqlfile.load("tasks.sql")
R = TypeVar("R", bound=tuple[Any, ...])

#: The outbox topic of task wake-ups; the publisher sends them to the task queue.
WAKE_TOPIC = "wake"
#: The outbox topic of ``runtime: lambda`` tasks; the publisher claims and invokes them.
INVOKE_TOPIC = "invoke"

#: How tasks are announced: ``"queue"`` writes wake-up outbox rows (remote workers);
#: ``"notify"`` only sends ``NOTIFY trace_tasks`` (in-process claimers).
WakeMode = Literal["queue", "notify"]


class LockedTask(NamedTuple):
    """A task locked for a decision with its current attempt (``lock_tasks``, ``lock_expired``,
    ``lock_due``): what the kernel decides on, and what tokens and staging prefixes need."""

    task_id: str
    org_id: str
    job_id: str | None
    operator: str
    state: str
    attempt: int
    lease_token: str | None
    lease_expires_at: datetime | None
    available_at: datetime
    max_attempts: int
    timeout_s: int
    read_datasets: list[str] | None
    outcome: str | None
    completion_digest: str | None
    started_at: datetime | None
    #: The database's ``now()``.
    now: datetime

    @property
    def view(self) -> TaskView:
        return TaskView(
            task_id=self.task_id,
            state=TaskState(self.state),
            attempt=self.attempt,
            lease_token=self.lease_token,
            lease_expires_at=self.lease_expires_at,
            available_at=self.available_at,
            max_attempts=self.max_attempts,
            attempt_outcome=AttemptOutcome(self.outcome) if self.outcome else None,
            completion_digest=self.completion_digest,
            timeout_s=self.timeout_s,
            started_at=self.started_at,
        )

    @property
    def grants(self) -> tuple[str, ...]:
        """Datasets the task's attempts may read (their tokens' ``grants.datasets.read``)."""
        return tuple(self.read_datasets or ())


class ClaimRow(NamedTuple):
    """A task locked for a claim, with everything the claim answers (``lock_tasks_for_claim``,
    ``lock_next_queued``)."""

    task_id: str
    org_id: str
    job_id: str | None
    operator: str
    state: str
    attempt: int
    lease_token: str | None
    lease_expires_at: datetime | None
    available_at: datetime
    max_attempts: int
    timeout_s: int
    read_datasets: list[str] | None
    #: The stored payload as JSON text: parsed and checked before the claim commits.
    payload: str
    #: The database's ``now()``.
    now: datetime

    @property
    def view(self) -> TaskView:
        return TaskView(
            task_id=self.task_id,
            state=TaskState(self.state),
            attempt=self.attempt,
            lease_token=self.lease_token,
            lease_expires_at=self.lease_expires_at,
            available_at=self.available_at,
            max_attempts=self.max_attempts,
            timeout_s=self.timeout_s,
        )


class TaskRow(NamedTuple):
    """One task for fetch and inspection (``get_task``); JSON columns as text."""

    task_id: str
    org_id: str
    job_id: str | None
    operator: str
    payload: str
    state: str
    attempt: int
    lease_expires_at: datetime | None
    max_attempts: int
    timeout_s: int
    available_at: datetime
    result: str | None
    error: str | None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None


class AttemptRow(NamedTuple):
    """One attempt of a task (``task_attempts``)."""

    attempt: int
    worker_id: str | None
    started_at: datetime
    heartbeat_at: datetime | None
    lease_expires_at: datetime | None
    finished_at: datetime | None
    outcome: str
    error: str | None


class EventRow(NamedTuple):
    """One recorded event of a task (``task_events``)."""

    event_key: str
    attempt: int
    event_type: str
    payload: str
    created_at: datetime


class CreatedRow(NamedTuple):
    """A task as created (``insert_tasks``) or found by its idempotency key
    (``tasks_by_idempotency_key``, which also returns the key)."""

    task_id: str
    org_id: str
    operator: str
    state: str
    attempt: int
    max_attempts: int
    idempotency_key: str | None


class TaskIdRow(NamedTuple):
    """A task id (``existing_tasks``, ``lock_stale_queued``)."""

    task_id: str


class OrgIdRow(NamedTuple):
    """An org id (``ensure_org``, ``task_org``)."""

    org_id: str


class BufferBatchRow(NamedTuple):
    """A recorded buffer batch pointer (``buffer_batch``)."""

    dataset: str
    #: ``None`` for rows published inline.
    object_key: str | None
    row_count: int
    byte_size: int
    sha256: str
    attempt: int
    #: The batch's scope as published (``None`` for none).
    scope: dict[str, Any] | None


class EventKeyRow(NamedTuple):
    """A newly recorded event key (``insert_events``)."""

    event_key: str


class CountRow(NamedTuple):
    """Rows per state (``task_counts``, ``outbox_counts``)."""

    state: str
    n: int


class OutboxRow(NamedTuple):
    """A due outbox row claimed for publishing (``claim_outbox``)."""

    id: int
    topic: str
    payload: dict[str, Any]
    tries: int
    #: The database's ``now()``.
    now: datetime


async def fetch(
    cur: psycopg.AsyncCursor[Any], cls: type[R], query: str, params: Mapping[str, Any]
) -> list[R]:
    """``query``'s rows as ``cls`` instances, read by name (``pg.fetch_named``)."""
    return await fetch_named(cur, cls, query, params)


async def lock_task(cur: psycopg.AsyncCursor[Any], task_id: str) -> LockedTask:
    """Lock one task with its current attempt for a decision. Raises ``NotFound``."""
    rows = await fetch(cur, LockedTask, Q["lock_tasks"], {"task_ids": [task_id]})
    if not rows:
        raise errors.NotFound("no such task", field="task_id")
    return rows[0]


async def task_row(cur: psycopg.AsyncCursor[Any], task_id: str) -> TaskRow:
    """The task (``get_task``), unlocked. Raises ``NotFound``."""
    rows = await fetch(cur, TaskRow, Q["get_task"], {"task_id": task_id})
    if not rows:
        raise errors.NotFound("no such task", field="task_id")
    return rows[0]


async def insert_events(
    cur: psycopg.AsyncCursor[Any], fence: Fence, events: Sequence[wire.EventIn]
) -> int:
    """Record events of ``fence``'s attempt; returns how many keys were new to the task.
    Raises ``ValidationFailed`` for a key twice in ``events``."""
    if not events:
        return 0
    keys = [e.key for e in events]
    if len(set(keys)) != len(keys):
        raise errors.ValidationFailed("event keys must be unique in one call", field="events")
    inserted = await fetch(
        cur,
        EventKeyRow,
        Q["insert_events"],
        {
            "task_id": fence.task_id,
            "attempt": fence.attempt,
            "keys": keys,
            "types": [e.type for e in events],
            "payloads": [Jsonb(e.payload) for e in events],
        },
    )
    return len(inserted)


async def wake(cur: psycopg.AsyncCursor[Any], task_ids: list[str], mode: WakeMode) -> None:
    """Announce queued tasks in the caller's transaction: outbox wake-ups (``invoke`` rows for
    ``runtime: lambda`` tasks) and ``NOTIFY trace_outbox`` in ``"queue"`` mode, ``NOTIFY
    trace_tasks`` in ``"notify"`` mode (both delivered at commit)."""
    if not task_ids:
        return
    if mode == "queue":
        await cur.execute(Q["insert_wakes"], {"topic": WAKE_TOPIC, "task_ids": task_ids})
        await cur.execute(Q["notify_outbox"])
    else:
        await cur.execute(Q["notify_tasks"])


def stored_json(text: str | None, field: str) -> Any:
    """A JSON column read as text, parsed and held to the JSON limits. Raises ``Conflict`` when
    the stored value cannot be served (nested too deep, NUL, ... written around the API)."""
    if text is None:
        return None
    try:
        return json_limits.loads(text)
    except errors.InvalidRequest as exc:
        raise errors.Conflict(
            f"the task's stored {field} cannot be served: {exc.message}", field=field
        ) from None


def inspectable(text: str | None) -> Any:
    """``stored_json`` for inspection: an unservable value shows as ``{"unservable": why}``."""
    try:
        return stored_json(text, "value")
    except errors.Conflict as exc:
        return {"unservable": exc.message}


def jsonable(value: Any) -> Any:
    """``value`` with datetimes and UUIDs as strings (for inspection answers)."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [jsonable(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    return value


__all__ = [
    "INVOKE_TOPIC",
    "WAKE_TOPIC",
    "AttemptRow",
    "BufferBatchRow",
    "ClaimRow",
    "CountRow",
    "CreatedRow",
    "EventKeyRow",
    "EventRow",
    "LockedTask",
    "OrgIdRow",
    "OutboxRow",
    "Q",
    "TaskIdRow",
    "TaskRow",
    "WakeMode",
    "fetch",
    "insert_events",
    "inspectable",
    "jsonable",
    "lock_task",
    "stored_json",
    "task_row",
    "wake",
]
