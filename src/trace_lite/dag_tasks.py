"""Creating the tasks of DAG jobs: one guarded insert shared by triggers, schedules, the fan-out,
rebuilds (``trace_lite.dag_remat``) and invalidation reruns (``trace_lite.dag_invalidations``).

Which version a task may be created for is decided under the DAG row's ``FOR SHARE`` lock, so a
deploy, cutover or rollback (``FOR UPDATE``) either happens before (the creator sees it) or
waits for the creating transaction:

* a job of the DAG's **active** version, unless a building staging rebuilds that job;
* a job the building **staged** version rebuilds (``dag_rematerializations.rebuild``).

Anything else (the caller planned against a version that moved meanwhile) raises ``Conflict``
and nothing is created; the fan-out rolls back and plans again, a trigger answers 409.

Idempotency keys: every DAG task carries one (unique per org). A job a staging rebuilt carries
that staging's version as its *epoch* (``dag_live_jobs.epoch``, migration 0018) in the key
(``with_epoch``), so a rebuild's replayed events and the same events drained after the cutover
make one task, while the job's tasks from before the rebuild never stand in for them.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs
import psycopg
from psycopg.types.json import Jsonb

from trace_core import errors, lifecycle
from trace_core.dag import event_matches, where_conditions
from trace_core.lifecycle import TaskState
from trace_lite import sqlfile
from trace_lite.dag_grants import read_grants
from trace_lite.pg import fetch_as
from trace_lite.task_rows import WakeMode, wake

Q = sqlfile.load("dags.sql")


def with_epoch(key: str, epoch: int | None) -> str:
    """``key`` of a job rebuilt by the staging of version ``epoch``: ``key@epoch``."""
    return key if epoch is None else f"{key}@{epoch}"


@attrs.frozen
class NewTask:
    """A task of a DAG job to create."""

    org_id: str
    dag_id: str
    version: int
    job: str
    operator: str
    runtime: str
    timeout_s: int
    max_attempts: int
    payload: Mapping[str, Any]
    idempotency_key: str
    task_id: str = attrs.field(factory=lambda: str(uuid.uuid4()))


@attrs.frozen
class CreatedRow:
    task_id: str
    state: str


@attrs.frozen
class LiveRow:
    """A DAG's active version and its building staging (if any), read under ``FOR SHARE``."""

    dag_id: str
    active_version: int | None
    staged_version: int | None
    rebuild: list[str]

    def allows(self, version: int, job: str) -> bool:
        if version == self.staged_version:
            return job in self.rebuild
        return version == self.active_version and (
            self.staged_version is None or job not in self.rebuild
        )


@attrs.frozen
class PlanRow:
    """One (event, consuming job) pair of a fan-out pass (or of a rebuild's replay)."""

    outbox_id: int | None
    producer_task_id: str
    event_key: str
    event_seq: int
    event_type: str
    event_payload: str
    output: int
    org_id: str
    dag_id: str
    version: int
    job: str
    input_index: int
    operator: str
    runtime: str
    config: str
    timeout_s: int
    max_attempts: int
    #: The consuming job's epoch (``dag_tasks.with_epoch``).
    epoch: int | None
    #: The consumer is a staged job and the event's task is not: the event waits.
    held: bool
    dataset_uuid: str | None
    dataset_version: str | None
    #: The consuming input's ``where`` as the spec stores it (None: no filter).
    input_where: dict[str, Any] | None

    def passes_where(self) -> bool:
        """Whether the event passes the consuming input's ``where`` (``trace_core.dag``)."""
        if not self.input_where:
            return True
        return event_matches(where_conditions(self.input_where), json.loads(self.event_payload))

    def new_task(self, *, version: int | None = None, epoch: int | None = None) -> NewTask:
        """The consuming job's task for this event: its config with ``event`` merged in."""
        return NewTask(
            org_id=self.org_id,
            dag_id=self.dag_id,
            version=self.version if version is None else version,
            job=self.job,
            operator=self.operator,
            runtime=self.runtime,
            timeout_s=self.timeout_s,
            max_attempts=self.max_attempts,
            payload={
                **json.loads(self.config),
                "event": {
                    "producer_task_id": self.producer_task_id,
                    "key": self.event_key,
                    "type": self.event_type,
                    "payload": json.loads(self.event_payload),
                    "output": self.output,
                    "input": self.input_index,
                },
            },
            idempotency_key=self.idempotency_key,
        )

    @property
    def idempotency_key(self) -> str:
        return with_epoch(
            f"event:{self.producer_task_id}:{self.output}:{self.event_key}:"
            f"{self.dag_id}:{self.job}:{self.input_index}",
            self.epoch,
        )


async def lock_live(cur: psycopg.AsyncCursor[Any], dag_ids: Iterable[str]) -> dict[str, LiveRow]:
    """The DAGs ``dag_ids`` with their active and staged versions, locked ``FOR SHARE``."""
    params = {"dag_ids": sorted(set(dag_ids))}
    return {r.dag_id: r for r in await fetch_as(cur, LiveRow, Q["lock_live_versions"], params)}


async def create_dag_tasks(
    cur: psycopg.AsyncCursor[Any],
    tasks: Sequence[NewTask],
    wake_mode: WakeMode,
    *,
    held: Iterable[tuple[str, int]] = (),
) -> dict[str, str]:
    """Create ``tasks`` in the caller's transaction, each with the read grants of its job
    (``trace_lite.dag_grants``), and wake the queued ones; a task whose idempotency key its org
    already has is skipped. ``held``: ``(dag_id, version)`` pairs the caller decided to hold
    events for, which must still be building stagings. Returns ``{task_id: state}`` of those
    created. Raises ``Conflict`` (a version moved since the caller planned; nothing created)."""
    held = list(held)
    if not tasks and not held:
        return {}
    live = await lock_live(cur, [t.dag_id for t in tasks] + [d for d, _ in held])
    for t in tasks:
        row = live.get(t.dag_id)
        if row is None or not row.allows(t.version, t.job):
            # A deploy, cutover or rollback moved the version after the caller read it.
            raise errors.Conflict("the DAG's active version changed; try again", field="dag")
    for dag_id, version in held:
        if live[dag_id].staged_version != version:
            raise errors.Conflict("the DAG's staging ended; try again", field="dag")
    if not tasks:
        return {}
    state = lifecycle.decide_create(delay_s=0).value
    grants = await read_grants(cur, ((t.dag_id, t.version, t.job) for t in tasks))
    batch = [
        {
            "task_id": t.task_id,
            "org_id": t.org_id,
            "operator": t.operator,
            "payload": dict(t.payload),
            "state": state,
            "max_attempts": t.max_attempts,
            "timeout_s": t.timeout_s,
            "idempotency_key": t.idempotency_key,
            "runtime": t.runtime,
            "dag_id": t.dag_id,
            "dag_version": t.version,
            "dag_job": t.job,
            "read_datasets": list(grants[(t.dag_id, t.version, t.job)]),
        }
        for t in tasks
    ]
    rows = await fetch_as(cur, CreatedRow, Q["insert_dag_tasks"], {"rows": Jsonb(batch)})
    await wake(cur, [r.task_id for r in rows if r.state == TaskState.QUEUED.value], wake_mode)
    return {r.task_id: r.state for r in rows}


async def insert_lineage(
    cur: psycopg.AsyncCursor[Any], rows: Sequence[tuple[str, PlanRow]]
) -> None:
    """Record ``task_inputs`` of tasks created for events: ``(task_id, plan row)``."""
    if not rows:
        return
    batch = [
        {
            "task_id": task_id,
            "input_index": p.input_index,
            "producer_task_id": p.producer_task_id,
            "event_key": p.event_key,
            "event_seq": p.event_seq,
            "dataset_uuid": p.dataset_uuid,
            "dataset_version": p.dataset_version,
        }
        for task_id, p in rows
    ]
    await cur.execute(Q["insert_task_inputs"], {"rows": Jsonb(batch)})


__all__ = [
    "LiveRow",
    "NewTask",
    "PlanRow",
    "create_dag_tasks",
    "insert_lineage",
    "lock_live",
    "with_epoch",
]
