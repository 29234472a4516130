"""Running deployed DAGs: manual triggers, cron/interval schedules, event -> task fan-out.

Every task of a DAG job records the DAG, its version and the job (``tasks.dag_id``,
``dag_version``, ``dag_job``) and is created idempotently through the task's
``idempotency_key`` (unique per org), so running any of these twice creates each task once:

* a manual trigger (``DagRuns.trigger``) runs a source job of the active version under a
  durable run id: ``{dag}:{job}:{run_id}`` (a new id when none is given; triggering the same run
  again answers its task -- a restarted source continues the same run);
* a schedule pass (``DagRuns.schedule_once``) fires the latest due slot of every cron and
  interval trigger of the active versions, as ``{dag}:{job}:{scheduled_time}``; a slot before the
  version was deployed is not fired, and a slot missed while no Dispatcher ran is skipped (only
  the latest slot fires). Times are the database's ``now()``, cron in UTC (croniter);
* a fan-out pass (``DagRuns.fan_out_once``) consumes the events of DAG tasks: each event recorded
  by a task of a DAG is announced in ``outbox`` (topic ``dag.event``, written by a trigger on
  ``task_events`` in the event's own transaction, migration 0011). A pass locks announcements
  (``FOR UPDATE SKIP LOCKED``), creates one task per consuming job of each event -- 1 event, 1
  task per consumer, never coalesced -- with its lineage (``task_inputs``: the producing task,
  the event, the dataset version read), wakes them, and marks the announcements published,
  all in one transaction: an announcement is never marked consumed without its tasks. The key
  ``event:{producer_task}:{output}:{event_key}:{dag_id}:{job}:{input}`` makes a repeated or
  concurrent pass create nothing twice.

A task's payload is its job's ``config`` with, per kind of run: the trigger's payload merged
over it (manual), ``scheduled_time`` (schedules), or ``event``: ``{producer_task_id, key, type,
payload, output, input}`` (fan-out). The consuming input's ``where`` is applied to the event's
payload (``trace_core.dag.event_matches``): an event that fails it makes no task for that job.
Tasks are created by ``trace_lite.dag_tasks.create_dag_tasks`` in the version that is live for
their job (a job a staging rebuilds runs in the staged version; an event for it from a task that
is not staged waits for the cutover, ``trace_lite.dag_remat``), with the read grants of the job.
``run`` also runs the cutover pass (``trace_lite.dag_remat``) and the invalidation pass
(``trace_lite.dag_invalidations``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import attrs
from croniter import croniter  # type: ignore[import-untyped]
from psycopg_pool import AsyncConnectionPool

from trace_core import access, errors, json_limits
from trace_core import outbox as outbox_sm
from trace_core.access import UserCaller
from trace_lite import sqlfile
from trace_lite.dag_invalidations import Invalidations
from trace_lite.dag_remat import DagRemat
from trace_lite.dag_tasks import NewTask, PlanRow, create_dag_tasks, insert_lineage, with_epoch
from trace_lite.orgs import Orgs, first
from trace_lite.pg import fetch_as, pg_array, transaction
from trace_lite.task_rows import WakeMode
from trace_sdk.aio import run_every

log = logging.getLogger("trace.dag_runs")

Q = sqlfile.load("dags.sql")

#: The outbox topic announcing events of DAG tasks to the fan-out.
EVENT_TOPIC = "dag.event"


@attrs.frozen
class SourceJobRow:
    dag_id: str
    version: int
    operator: str
    runtime: str
    config: str
    timeout_s: int
    max_attempts: int
    triggers: str
    epoch: int | None
    is_source: bool


@attrs.frozen
class ClaimedRow:
    id: int
    tries: int


@attrs.frozen
class ScheduledRow:
    org_id: str
    dag_id: str
    dag: str
    version: int
    job: str
    operator: str
    runtime: str
    config: str
    timeout_s: int
    max_attempts: int
    triggers: str
    deployed_at: datetime
    epoch: int | None
    now: datetime


@attrs.frozen
class FanOutReport:
    #: Announcements consumed (marked published).
    events: int = 0
    #: Tasks created (repeats of an existing idempotency key not counted).
    created: int = 0
    #: Announcements left waiting for a staging's cutover (a staged consumer).
    held: int = 0


def latest_slot(trigger: Mapping[str, Any], now: datetime) -> datetime | None:
    """The latest time at or before ``now`` (UTC) a cron or interval trigger fires; None for
    other triggers."""
    now = now.astimezone(UTC)
    match trigger.get("type"):
        case "cron":
            minute = now.replace(second=0, microsecond=0)
            if croniter.match(trigger["schedule"], minute):
                return minute
            prev: datetime = croniter(trigger["schedule"], now).get_prev(datetime)
            return prev.astimezone(UTC)
        case "interval":
            every = int(trigger["every"])
            epoch = int(now.timestamp())
            return datetime.fromtimestamp(epoch - epoch % every, UTC)
    return None


class DagRuns:
    """Triggers, schedules and fan-out of the DAGs deployed in one Postgres state database."""

    def __init__(
        self,
        pool: AsyncConnectionPool,
        *,
        wake_mode: WakeMode = "queue",
        orgs: Orgs | None = None,
    ) -> None:
        self.pool = pool
        self.wake_mode: WakeMode = wake_mode
        self.orgs = orgs or Orgs(pool)

    # -- manual triggers ------------------------------------------------------------------------

    async def trigger(
        self,
        caller: UserCaller | None,
        org: str,
        dag: str,
        job: str,
        *,
        payload: Mapping[str, Any] | None = None,
        run_id: str | None = None,
    ) -> dict[str, Any]:
        """Run source job ``job`` of ``dag``'s active version as run ``run_id`` (a new one when
        None). Returns ``{task_id, created, dag, job, version, run_id}``; a run already
        triggered answers its task with ``created: False``.

        ``caller=None`` is the platform. Raises ``NotFound`` (no such org, DAG, deployed
        version or job), ``Forbidden`` (not a deployer or triggerer of the DAG),
        ``ValidationFailed`` (not a source job, no manual trigger, payload over the JSON
        limits), ``Unavailable``.
        """
        payload = dict(payload or {})
        json_limits.check(payload, path="payload")
        run_id = run_id or uuid.uuid4().hex
        org_id = await self.orgs.org_id(org)
        if caller is not None and (
            caller.org_id != org_id or (not caller.member and not caller.dags)
        ):
            raise errors.NotFound("no such org", field="org")  # before anything of the org
        async with transaction(self.pool) as cur:
            params = {"org_id": org_id, "dag": dag, "job": job}
            row = first(await fetch_as(cur, SourceJobRow, Q["source_job"], params))
            if caller is not None:
                dag_row = first(
                    await fetch_as(cur, _DagIdRow, Q["dag"], {"org_id": org_id, "name": dag})
                )
                if dag_row is None:
                    raise errors.NotFound("no such DAG", field="dag")
                access.check_trigger(caller, org_id, dag_row.dag_id)
            if row is None:
                raise errors.NotFound("no such job in the DAG's active version", field="job")
            if not row.is_source:
                raise errors.ValidationFailed(
                    f"job {job!r} has inputs: its events run it, not a trigger", field="job"
                )
            if not any(t.get("type") == "manual" for t in json.loads(row.triggers)):
                raise errors.ValidationFailed(
                    f"job {job!r} has no manual trigger (add `- type: manual` to its triggers)",
                    field="job",
                )
            key = with_epoch(f"{dag}:{job}:{run_id}", row.epoch)
            task = NewTask(
                org_id=org_id,
                dag_id=row.dag_id,
                version=row.version,
                job=job,
                operator=row.operator,
                runtime=row.runtime,
                timeout_s=row.timeout_s,
                max_attempts=row.max_attempts,
                payload={**json.loads(row.config), **payload},
                idempotency_key=key,
            )
            created = await create_dag_tasks(cur, [task], self.wake_mode)
            task_id = task.task_id
            if not created:
                params = {"org_id": org_id, "idempotency_key": key}
                (existing,) = await fetch_as(cur, CreatedRow, Q["task_by_key"], params)
                task_id = existing.task_id
        return {
            "task_id": task_id,
            "created": bool(created),
            "dag": dag,
            "job": job,
            "version": row.version,
            "run_id": run_id,
        }

    # -- schedules ------------------------------------------------------------------------------

    async def schedule_once(self) -> int:
        """Fire the latest due slot of every cron and interval trigger of the active versions
        (see the module docstring). Returns the number of tasks created."""
        async with transaction(self.pool) as cur:
            rows = await fetch_as(cur, ScheduledRow, Q["scheduled_jobs"], {})
            tasks: list[NewTask] = []
            for r in rows:
                for trigger in json.loads(r.triggers):
                    slot = latest_slot(trigger, r.now)
                    if slot is None or slot < r.deployed_at:
                        continue
                    when = slot.isoformat()
                    tasks.append(
                        NewTask(
                            org_id=r.org_id,
                            dag_id=r.dag_id,
                            version=r.version,
                            job=r.job,
                            operator=r.operator,
                            runtime=r.runtime,
                            timeout_s=r.timeout_s,
                            max_attempts=r.max_attempts,
                            payload={**json.loads(r.config), "scheduled_time": when},
                            idempotency_key=with_epoch(f"{r.dag}:{r.job}:{when}", r.epoch),
                        )
                    )
            created = await create_dag_tasks(cur, _unique(tasks), self.wake_mode)
        return len(created)

    # -- fan-out --------------------------------------------------------------------------------

    async def fan_out_once(self, batch: int = 500) -> FanOutReport:
        """Consume up to ``batch`` announced events of DAG tasks in one transaction (see the
        module docstring). Returns what was consumed and created."""
        async with transaction(self.pool) as cur:
            claimed = await fetch_as(
                cur, ClaimedRow, Q["claim_dag_events"], {"topic": EVENT_TOPIC, "batch": batch}
            )
            if not claimed:
                return FanOutReport()
            ids = [c.id for c in claimed]
            plan = await fetch_as(cur, PlanRow, Q["fan_out_plan"], {"ids": pg_array(ids)})
            held = [p for p in plan if p.held]
            wanted = [p for p in plan if not p.held and p.passes_where()]
            tasks = [p.new_task() for p in wanted]
            created = await create_dag_tasks(
                cur, tasks, self.wake_mode, held={(p.dag_id, p.version) for p in held}
            )
            lineage = [(t, p) for t, p in zip(tasks, wanted, strict=True) if t.task_id in created]
            await insert_lineage(cur, [(t.task_id, p) for t, p in lineage])
            waiting = {p.outbox_id for p in held if p.outbox_id is not None}
            consumed = [c for c in claimed if c.id not in waiting]
            if waiting:
                await cur.execute(Q["hold_events"], {"ids": pg_array(sorted(waiting))})
            sent = [outbox_sm.decide_sent(outbox_sm.OutboxState.PENDING, c.tries) for c in consumed]
            await cur.execute(
                Q["mark_events_consumed"],
                {
                    "ids": pg_array([c.id for c in consumed]),
                    "states": pg_array([d.state.value for d in sent]),
                    "tries": pg_array([d.tries for d in sent]),
                },
            )
        return FanOutReport(events=len(consumed), created=len(created), held=len(waiting))

    async def run(
        self, stop: asyncio.Event, *, fan_out_every_s: float = 0.2, schedule_every_s: float = 1.0
    ) -> None:
        """The DAG passes until ``stop`` is set (``run_every``: failures are logged and retried
        with backoff): fan-out, schedules, cutovers of complete rebuilds
        (``trace_lite.dag_remat``) and invalidation cascades (``trace_lite.dag_invalidations``)."""
        remat = DagRemat(self.pool)
        invalidations = Invalidations(self.pool, wake_mode=self.wake_mode, orgs=self.orgs)
        await asyncio.gather(
            run_every(stop, fan_out_every_s, self.fan_out_once, name="dag fan-out", logger=log),
            run_every(stop, schedule_every_s, self.schedule_once, name="dag schedules", logger=log),
            remat.run(stop, every_s=schedule_every_s),
            invalidations.run(stop, every_s=schedule_every_s),
        )


@attrs.frozen
class _DagIdRow:
    dag_id: str
    active_version: int | None
    active_generation: int | None


@attrs.frozen
class CreatedRow:
    task_id: str
    state: str


def _unique(tasks: list[NewTask]) -> list[NewTask]:
    """One task per (org, idempotency key): two triggers of a job firing the same slot."""
    seen: dict[tuple[str, str], NewTask] = {}
    for t in tasks:
        seen.setdefault((t.org_id, t.idempotency_key), t)
    return list(seen.values())


__all__ = [
    "EVENT_TOPIC",
    "DagRuns",
    "FanOutReport",
    "NewTask",
    "create_dag_tasks",
    "latest_slot",
]
