"""Creating, canceling and inspecting tasks: the Dispatcher's operations that no attempt fences.

``TaskAdmin`` creates tasks (queued, or pending when delayed) and wakes workers in the same
transaction, answers an idempotent repeat with the task it already created, cancels (the
kernel's ``decide_cancel``, applied as a compare-and-swap on the state) and reads tasks, their
attempts and events back for inspection. A stored JSON value that cannot be served is shown as
such, never served.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from trace_core import errors, json_limits, lifecycle, wire
from trace_core.lifecycle import TaskState
from trace_lite.pg import transaction
from trace_lite.task_orgs import TaskOrgs
from trace_lite.task_rows import (
    AttemptRow,
    CountRow,
    CreatedRow,
    EventRow,
    Q,
    WakeMode,
    fetch,
    inspectable,
    jsonable,
    lock_task,
    task_row,
    wake,
)


class TaskAdmin:
    """Creates, cancels and inspects tasks (see the module docstring)."""

    def __init__(self, pool: AsyncConnectionPool, *, orgs: TaskOrgs, wake_mode: WakeMode) -> None:
        self.pool = pool
        self.orgs = orgs
        self.wake_mode: WakeMode = wake_mode

    async def create_tasks(self, requests: Sequence[wire.CreateTaskRequest]) -> list[wire.TaskInfo]:
        """Create tasks (queued, or pending when delayed) and wake workers in one transaction.

        A request whose ``idempotency_key`` already exists in its org returns the existing task
        with ``created=False``. Raises ``ValidationFailed`` for a payload over the JSON limits
        (``trace_core.json_limits``), ``Unavailable``.
        """
        for i, r in enumerate(requests):
            json_limits.check(r.payload, path=f"tasks[{i}].payload")
        async with transaction(self.pool) as cur:
            org_ids = [await self.orgs.org_id(cur, r.org) for r in requests]
            task_ids = [str(uuid.uuid4()) for _ in requests]
            params = {
                "task_ids": task_ids,
                "org_ids": org_ids,
                "operators": [r.operator for r in requests],
                "payloads": [Jsonb(r.payload) for r in requests],
                "states": [lifecycle.decide_create(delay_s=r.delay_s).value for r in requests],
                "max_attempts": [r.max_attempts for r in requests],
                "timeouts": [r.timeout_s for r in requests],
                "delays": [r.delay_s for r in requests],
                "idempotency_keys": [r.idempotency_key for r in requests],
                "runtimes": [r.runtime for r in requests],
                "read_datasets": [Jsonb(r.read_datasets) for r in requests],
            }
            rows = await fetch(cur, CreatedRow, Q["insert_tasks"], params)
            created = {r.task_id: _info(r) for r in rows}
            await wake(
                cur,
                [t.task_id for t in created.values() if t.state == TaskState.QUEUED],
                self.wake_mode,
            )
            if len(created) == len(requests):
                return [created[t] for t in task_ids]
            # Some were idempotent repeats: answer with the existing tasks, in request order.
            keyed = [
                (o, r.idempotency_key)
                for o, r in zip(org_ids, requests, strict=True)
                if r.idempotency_key is not None
            ]
            found = await fetch(
                cur,
                CreatedRow,
                Q["tasks_by_idempotency_key"],
                {"org_ids": [o for o, _ in keyed], "idempotency_keys": [k for _, k in keyed]},
            )
            existing = {(r.org_id, r.idempotency_key): r for r in found}
            return [
                created[tid]
                if tid in created
                else _info(existing[(org_id, r.idempotency_key)], created=False)
                for tid, org_id, r in zip(task_ids, org_ids, requests, strict=True)
            ]

    async def cancel(self, task_id: str) -> wire.TaskInfo:
        """Cancel a task; canceling a canceled task is a no-op.

        A running attempt learns it at its next heartbeat or completion (``TaskCanceled``).
        Raises ``NotFound``, ``Conflict`` for a completed or failed task.
        """
        async with transaction(self.pool) as cur:
            task = (await lock_task(cur, task_id)).view
            target = lifecycle.decide_cancel(task)
            if target is not None:
                await cur.execute(
                    Q["apply_cancel"], {"task_id": task_id, "expected_state": task.state.value}
                )
                if cur.rowcount != 1:
                    raise errors.Conflict("task changed while canceling")
            row = await task_row(cur, task_id)
        return wire.TaskInfo(
            row.task_id, row.org_id, row.operator, row.state, row.attempt, row.max_attempts
        )

    async def get_task(self, task_id: str) -> dict[str, Any]:
        """The task with its attempts and events, for inspection; a stored JSON value that
        cannot be served shows as ``{"unservable": <why>}``. Raises ``NotFound``."""
        async with transaction(self.pool) as cur:
            row = await task_row(cur, task_id)
            attempts = await fetch(cur, AttemptRow, Q["task_attempts"], {"task_id": task_id})
            events = await fetch(cur, EventRow, Q["task_events"], {"task_id": task_id})
        task: dict[str, Any] = row._asdict()
        for name in ("payload", "result", "error"):
            task[name] = inspectable(task[name])
        task["attempts"] = [{**a._asdict(), "error": inspectable(a.error)} for a in attempts]
        task["events"] = [{**e._asdict(), "payload": inspectable(e.payload)} for e in events]
        return dict(jsonable(task))

    async def counts(self) -> dict[str, int]:
        """Tasks per state."""
        async with transaction(self.pool) as cur:
            return {r.state: r.n for r in await fetch(cur, CountRow, Q["task_counts"], {})}

    async def outbox_counts(self) -> dict[str, int]:
        """Outbox rows per state."""
        async with transaction(self.pool) as cur:
            return {r.state: r.n for r in await fetch(cur, CountRow, Q["outbox_counts"], {})}


def _info(row: CreatedRow, *, created: bool = True) -> wire.TaskInfo:
    return wire.TaskInfo(
        row.task_id,
        row.org_id,
        row.operator,
        row.state,
        row.attempt,
        row.max_attempts,
        created=created,
    )


__all__ = ["TaskAdmin"]
