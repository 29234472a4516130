"""Invalidation cascades: rerun exactly the DAG work that read a replaced range of a dataset.

When a range (or partition key) of a dataset version is rewritten (``update_strategy:
replace``), every DAG task that read the old rows of that scope is stale. ``invalidate``
finds them through the lineage the fan-out recorded (``task_inputs``: the task, the dataset
its input read, the producing event -- whose payload names the ``start``/``end`` range or the
``partition_key`` it announced) and creates one rerun per (consuming job, input, producing
event): a new task of the consuming job's **active** version with the same event in its
payload (plus ``rerun_of``: the stale task), the read grants of its job, and lineage of its
own. The cascade is transitive through events: a rerun emits its events again and the
fan-out hands them to the next jobs, once each (their producer is the rerun); a rerun that
rewrites a ``replace`` output emits its own invalidation, handled the same way.

Rules, each kept by a test (``tests/integration/test_dag_invalidations.py``):

* **exactly the affected scope**: a task whose event announced a range that does not overlap
  the replaced one (or another partition key) is not rerun; an event that names no range and
  no key cannot be placed and is not rerun;
* **no double work with the fan-out**: when a task that committed the live partitions of the
  scope also recorded an event of that dataset's output covering the scope (the usual case: a
  DAG task re-extracted the range and announced it), the fan-out of that event already reruns
  every consumer, and ``invalidate`` creates nothing (``announced_by_producer``);
* **idempotent**: a rerun's idempotency key names the newest live partition of the scope, so
  invalidating the same replacement twice creates nothing new, and a later replacement of the
  same scope reruns again;
* a consuming job no longer in its DAG's active version (or whose input index is gone) is
  skipped (``skipped``), and so is a job that a staged version is rebuilding (the rebuild reads
  the new data; ``trace_lite.dag_remat``).

Two ways in, one code path (``invalidate_in``, in the caller's transaction):

* ``Invalidations.invalidate(caller, org, dataset, start=..., end=...)`` (or ``key=...``):
  the API (``trace dag invalidate ORG DATASET --range START:END``). A task's replace commit
  already emits an invalidation (``trace_lite.outputs.INVALIDATE_TOPIC``), so call this for a
  replace made outside a task commit, or to run a cascade again;
* ``Invalidations.consume_once()``: the Dispatcher's pass consuming the invalidations replace
  commits announce in the outbox, each in the transaction that creates its reruns.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import attrs
import psycopg
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from trace_core import access, errors
from trace_core import outbox as outbox_sm
from trace_core.access import UserCaller
from trace_lite import sqlfile
from trace_lite.dag_tasks import NewTask, create_dag_tasks
from trace_lite.orgs import Orgs, first
from trace_lite.outputs import INVALIDATE_TOPIC
from trace_lite.pg import fetch_as, transaction
from trace_lite.task_rows import WakeMode
from trace_sdk.aio import run_every

log = logging.getLogger("trace.dag_invalidations")

Q = sqlfile.load("dag_invalidations.sql")
#: Lineage statements shared with the fan-out.
DQ = sqlfile.load("dags.sql")


@attrs.frozen
class Scope:
    """A replaced scope: a half-open block range ``[start, end)`` or one partition key."""

    start: int | None = None
    end: int | None = None
    key: str | None = None

    def __attrs_post_init__(self) -> None:
        ranged = self.start is not None or self.end is not None
        if ranged == (self.key is not None):
            raise errors.ValidationFailed("give a range (start and end) or a key", field="start")
        if ranged and (self.start is None or self.end is None or not 0 <= self.start < self.end):
            raise errors.ValidationFailed("the range needs 0 <= start < end", field="start")

    def text(self) -> str:
        return f"[{self.start}, {self.end})" if self.key is None else f"key {self.key!r}"


@attrs.frozen
class Rerun:
    """One task created by an invalidation."""

    task_id: str
    dag: str
    job: str
    input_index: int
    #: The stale task it reruns.
    rerun_of: str


@attrs.frozen
class InvalidationReport:
    """What one invalidation did."""

    dataset: str
    dataset_version: str
    scope: Scope
    #: Tasks created to rerun (a repeated invalidation of the same replacement: none).
    reruns: tuple[Rerun, ...] = ()
    #: Stale (job, input, event) groups found through the lineage.
    dependents: int = 0
    #: Groups whose job is gone from its active version or is being rebuilt.
    skipped: int = 0
    #: The replacing task announced the scope itself: its fan-out reruns the consumers.
    announced_by_producer: bool = False

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.frozen
class _TargetRow:
    dataset_uuid: str
    job_name: str
    output_index: int
    dataset_version: str | None


@attrs.frozen
class _OutboxTargetRow:
    dataset_uuid: str
    job_name: str
    output_index: int
    dataset_version: str
    org_id: str
    name: str


@attrs.frozen
class _LiveRow:
    newest: int
    task_ids: list[str]


@attrs.frozen
class _AnnouncedRow:
    announced: bool


@attrs.frozen
class _DependentRow:
    rerun_of: str
    producer_task_id: str
    event_key: str
    event_seq: int
    event_type: str
    event_payload: str
    output: int
    org_id: str
    dag_id: str
    dag: str
    version: int | None
    job: str
    input_index: int
    operator: str | None
    runtime: str | None
    config: str | None
    timeout_s: int | None
    max_attempts: int | None
    in_active: bool
    rebuilding: bool


@attrs.frozen
class _ClaimedRow:
    id: int
    tries: int
    payload: str


class Invalidations:
    """Invalidation cascades over one Postgres state database (see the module docstring)."""

    def __init__(
        self, pool: AsyncConnectionPool, *, wake_mode: WakeMode = "queue", orgs: Orgs | None = None
    ) -> None:
        self.pool = pool
        self.wake_mode: WakeMode = wake_mode
        self.orgs = orgs or Orgs(pool)

    async def invalidate(
        self,
        caller: UserCaller | None,
        org: str,
        dataset: str,
        *,
        start: int | None = None,
        end: int | None = None,
        key: str | None = None,
        version: str | None = None,
    ) -> InvalidationReport:
        """Rerun the DAG tasks that read ``[start, end)`` (or partition ``key``) of dataset
        ``dataset`` of ``org``, in its version ``version`` (default: the producing DAG's
        active one), and, through their events, everything downstream of them. One
        transaction; idempotent for one replacement.

        ``caller=None`` is the platform (the chain ingest's reorg handling, tests). A user must
        be allowed to deploy the dataset's producing DAG (``trace_core.access.check_deploy``).
        Raises ``ValidationFailed`` (not exactly one of a range and a key; a bad range),
        ``NotFound`` (no such org or dataset, or no version to invalidate), ``Forbidden``,
        ``Unavailable``.
        """
        scope = Scope(start, end, key)
        org_id = await self.orgs.org_id(org)
        if caller is not None and caller.org_id != org_id:
            raise errors.NotFound("no such org", field="org")
        async with transaction(self.pool) as cur:
            params = {"org_id": org_id, "name": dataset, "version": version}
            row = first(await fetch_as(cur, _TargetRow, Q["target"], params))
            if row is None:
                raise errors.NotFound("no such dataset", field="dataset")
            if caller is not None:
                await _check_deployer(cur, caller, org_id, row.dataset_uuid)
            if row.dataset_version is None:
                raise errors.NotFound("the dataset has no active version", field="version")
            return await self.invalidate_in(
                cur,
                dataset=dataset,
                dataset_uuid=row.dataset_uuid,
                dataset_version=row.dataset_version,
                output=row.output_index,
                scope=scope,
            )

    async def invalidate_in(
        self,
        cur: psycopg.AsyncCursor[Any],
        *,
        dataset: str,
        dataset_uuid: str,
        dataset_version: str,
        output: int,
        scope: Scope,
    ) -> InvalidationReport:
        """``invalidate`` inside the caller's transaction, for a dataset already resolved
        (``output``: the index of the producing job's output the dataset publishes)."""
        where = {"start": scope.start, "end": scope.end, "key": scope.key}
        (live,) = await fetch_as(
            cur, _LiveRow, Q["live_producers"], {"version": dataset_version, **where}
        )
        report = InvalidationReport(dataset, dataset_version, scope)
        if live.task_ids:
            params = {"task_ids": live.task_ids, "output": output, **where}
            (announced,) = await fetch_as(cur, _AnnouncedRow, Q["announced_by"], params)
            if announced.announced:
                return attrs.evolve(report, announced_by_producer=True)
        rows = await fetch_as(
            cur, _DependentRow, Q["dependents"], {"dataset_uuid": dataset_uuid, **where}
        )
        usable = [r for r in rows if r.in_active and not r.rebuilding]
        tasks = [_rerun_task(r, live.newest) for r in usable]
        created = await create_dag_tasks(cur, tasks, self.wake_mode)
        lineage = [(t, r) for t, r in zip(tasks, usable, strict=True) if t.task_id in created]
        if lineage:
            await cur.execute(
                DQ["insert_task_inputs"],
                {
                    "rows": Jsonb(
                        [
                            {
                                "task_id": t.task_id,
                                "input_index": r.input_index,
                                "producer_task_id": r.producer_task_id,
                                "event_key": r.event_key,
                                "event_seq": r.event_seq,
                                "dataset_uuid": dataset_uuid,
                                "dataset_version": dataset_version,
                            }
                            for t, r in lineage
                        ]
                    )
                },
            )
        reruns = tuple(
            Rerun(t.task_id, r.dag, r.job, r.input_index, r.rerun_of) for t, r in lineage
        )
        return attrs.evolve(
            report, reruns=reruns, dependents=len(rows), skipped=len(rows) - len(usable)
        )

    async def consume_once(self, batch: int = 100) -> int:
        """Consume up to ``batch`` invalidations that replace commits announced (outbox topic
        ``trace_lite.outputs.INVALIDATE_TOPIC``), each cascaded as ``invalidate`` does, in one
        transaction with the reruns it creates. Returns the number consumed."""
        async with transaction(self.pool) as cur:
            params = {"topic": INVALIDATE_TOPIC, "batch": batch}
            claimed = await fetch_as(cur, _ClaimedRow, Q["claim_invalidations"], params)
            for c in claimed:
                inv = json.loads(c.payload)
                params = {"dataset_uuid": inv["dataset_uuid"], "version": inv["dataset_version"]}
                row = first(await fetch_as(cur, _OutboxTargetRow, Q["target_by_uuid"], params))
                if row is None:
                    continue
                scope = Scope(inv.get("start"), inv.get("end"), inv.get("key"))
                report = await self.invalidate_in(
                    cur,
                    dataset=row.name,
                    dataset_uuid=row.dataset_uuid,
                    dataset_version=row.dataset_version,
                    output=row.output_index,
                    scope=scope,
                )
                if report.reruns:
                    log.info(
                        "invalidation of %s %s reran %d task(s)",
                        row.name,
                        scope.text(),
                        len(report.reruns),
                    )
            if claimed:
                sent = [
                    outbox_sm.decide_sent(outbox_sm.OutboxState.PENDING, c.tries) for c in claimed
                ]
                await cur.execute(
                    Q["mark_consumed"],
                    {
                        "ids": [c.id for c in claimed],
                        "states": [d.state.value for d in sent],
                        "tries": [d.tries for d in sent],
                    },
                )
        return len(claimed)

    async def run(self, stop: asyncio.Event, *, every_s: float = 0.5) -> None:
        """``consume_once`` until ``stop`` is set (``run_every``: failures logged, retried)."""
        await run_every(stop, every_s, self.consume_once, name="dag invalidations", logger=log)


@attrs.frozen
class _DeployersRow:
    subject: str


async def _check_deployer(
    cur: psycopg.AsyncCursor[Any], caller: UserCaller, org_id: str, dataset_uuid: str
) -> None:
    rows = await fetch_as(cur, _DeployersRow, Q["deployers_of_dataset"], {"uuid": dataset_uuid})
    access.check_deploy(caller, org_id, frozenset(r.subject for r in rows))


def _rerun_task(r: _DependentRow, newest: int) -> NewTask:
    assert r.version is not None and r.operator is not None and r.runtime is not None
    assert r.config is not None and r.timeout_s is not None and r.max_attempts is not None
    return NewTask(
        org_id=r.org_id,
        dag_id=r.dag_id,
        version=r.version,
        job=r.job,
        operator=r.operator,
        runtime=r.runtime,
        timeout_s=r.timeout_s,
        max_attempts=r.max_attempts,
        payload={
            **json.loads(r.config),
            "event": {
                "producer_task_id": r.producer_task_id,
                "key": r.event_key,
                "type": r.event_type,
                "payload": json.loads(r.event_payload),
                "output": r.output,
                "input": r.input_index,
            },
            "rerun_of": r.rerun_of,
        },
        idempotency_key=(
            f"rerun:{newest}:{r.dag_id}:{r.job}:{r.input_index}:{r.producer_task_id}:{r.event_key}"
        ),
    )


__all__ = ["InvalidationReport", "Invalidations", "Rerun", "Scope"]
