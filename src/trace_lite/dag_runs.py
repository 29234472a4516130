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
* a fan-out pass (``DagRuns.fan_out_once``) consumes the events of DAG tasks: the events one
  statement records for a task of a DAG are announced in ``outbox`` by one row (topic
  ``dag.event``: the task, the events' keys and the outputs they were produced on, written by a
  trigger on ``task_events`` in the events' own transaction, migration 0032, ADR 0038). A pass
  locks announcements while their events fit its batch (``FOR UPDATE SKIP LOCKED``), creates one
  task per consuming job of each event -- 1 event, 1
  task per consumer, never coalesced -- with its lineage (``task_inputs``: the producing task,
  the event, the dataset version read), wakes them, and marks the announcements published,
  all in one transaction: an announcement is never marked consumed without its tasks. The key
  ``event:{producer_task}:{output}:{event_key}:{dag_id}:{job}:{input}`` makes a repeated or
  concurrent pass create nothing twice. The work is set-based: ``fan_out_inputs`` (dags.sql)
  locks the DAG rows involved ``FOR SHARE`` and answers each consuming input once, Python
  decides per input what the kernel decides (read grants, ``where`` on the events that reach
  it), and one statement (``fan_out``) plans every (event, consumer) pair and writes tasks,
  lineage, wake-ups and the announcements' new state. A pass that raced a deploy of a
  consuming DAG, or a concurrent creator of one of its keys, rolls back (``Conflict``) and the
  next pass plans again.

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
from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, NamedTuple, TypeVar

import attrs
import psycopg
from croniter import croniter  # type: ignore[import-untyped]
from psycopg.rows import class_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from trace_core import access, errors, json_limits, lifecycle
from trace_core import outbox as outbox_sm
from trace_core.access import UserCaller
from trace_core.dag import event_matches, where_conditions
from trace_core.lifecycle import TaskState
from trace_lite import sqlfile
from trace_lite.dag_grants import read_grants
from trace_lite.dag_invalidations import Invalidations
from trace_lite.dag_remat import DagRemat
from trace_lite.dag_tasks import NewTask, create_dag_tasks, with_epoch
from trace_lite.orgs import Orgs, first
from trace_lite.pg import fetch_as, fetch_named, pg_array, transaction
from trace_lite.pg_wakeups import run_woken
from trace_lite.task_rows import INVOKE_TOPIC, WAKE_TOPIC, WakeMode
from trace_lite.task_rows import Q as TASK_Q
from trace_sdk.aio import run_every

log = logging.getLogger("trace.dag_runs")

R = TypeVar("R")

Q = sqlfile.load("dags.sql")

#: The outbox topic announcing events of DAG tasks to the fan-out.
EVENT_TOPIC = "dag.event"
#: A fan-out pass's budget: events, and tasks (estimated) -- ``DagRuns.fan_out_once``.
DEFAULT_BATCH = 5000
#: The channel migration 0032's trigger notifies when it announces events.
EVENTS_CHANNEL = "trace_dag_events"


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


class AnnouncementRow(NamedTuple):
    """A claimed announcement: the events one statement of a task recorded (migration 0032)."""

    id: int
    tries: int
    task_id: str
    #: How many events it announces.
    events: int
    #: What its events were produced on, each once: ``[[output, sink dataset], ...]`` (JSON).
    srcs: str


class EventRow(NamedTuple):
    """An event of a claimed announcement, read only for the consuming inputs with a ``where``."""

    id: int
    task_id: str
    event_key: str
    output: int
    sink_dataset: str
    #: The event's payload (JSON text).
    payload: str

    @property
    def src(self) -> tuple[str, int, str]:
        """What the event was produced on: its task, output and sink dataset."""
        return (self.task_id, self.output, self.sink_dataset)


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
class ConsumerInputRow:
    """An input of a live DAG version that the events of a fan-out pass reach
    (``fan_out_inputs``), with its ``where`` and, when it has one, the producers that reach it."""

    dag_id: str
    version: int
    job: str
    input_index: int
    #: The input's ``where`` as the spec stores it (JSON text; None: no filter).
    input_where: str | None
    #: The producers that reach it: ``[[task_id, output, sink dataset], ...]`` (JSON text).
    srcs: str

    def grant(self, read_datasets: Sequence[str]) -> dict[str, Any]:
        """This input with the read grants of its job, as ``fan_out`` takes it."""
        return {
            "dag_id": self.dag_id,
            "version": self.version,
            "job": self.job,
            "input_index": self.input_index,
            "read_datasets": list(read_datasets),
        }

    @property
    def filtered(self) -> bool:
        """Whether the input has a ``where`` (``{}``: none)."""
        return bool(self.input_where and json.loads(self.input_where))

    def rejected(self, by_src: Mapping[tuple[str, int, str], list[EventRow]]) -> list[Any]:
        """The claimed events (``by_src``: by producing task, output and sink dataset) that
        reach this input and fail its ``where`` (``trace_core.dag.event_matches``)."""
        if not self.filtered:
            return []
        assert self.input_where is not None
        conditions = where_conditions(json.loads(self.input_where))
        return [
            {
                "outbox_id": e.id,
                "event_key": e.event_key,
                "dag_id": self.dag_id,
                "version": self.version,
                "job": self.job,
                "input_index": self.input_index,
            }
            for task_id, output, sink in json.loads(self.srcs)
            for e in by_src.get((task_id, output, sink), ())
            if not event_matches(conditions, json.loads(e.payload))
        ]


@attrs.frozen
class FanOutRow:
    created: int
    consumed: int
    held: int
    #: Consumers ``fan_out_inputs`` did not answer (a DAG deployed meanwhile).
    unplanned: int


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

    async def fan_out_once(self, batch: int = DEFAULT_BATCH) -> FanOutReport:
        """Consume announced events of DAG tasks in one transaction (see the module docstring):
        the announcements due first, while their events fit ``batch`` and the tasks they make
        (estimated: events x consuming inputs of what they were produced on) fit it too, at
        least one. Returns what was consumed and created. Raises ``Conflict`` (the pass raced a
        deploy or a creator: nothing is consumed; the next pass plans again), ``Unavailable``."""
        async with transaction(self.pool) as cur:
            locked = await fetch_named(
                cur,
                AnnouncementRow,
                Q["claim_dag_events"],
                {"topic": EVENT_TOPIC, "batch": batch},
            )
            if not locked:
                return FanOutReport()
            produced = [(c, [(c.task_id, o, k) for o, k in json.loads(c.srcs)]) for c in locked]
            srcs = {src: None for _, on in produced for src in on}
            inputs = await _fetch_prepared(
                cur,
                ConsumerInputRow,
                Q["fan_out_inputs"],
                {
                    "srcs": Jsonb(
                        [{"task_id": t, "output": o, "sink_dataset": k} for t, o, k in srcs]
                    )
                },
            )
            # the announcements this pass plans: the locked ones not planned stay pending, for
            # the next pass (their locks go at the commit)
            claimed = _within(produced, inputs, batch)
            ids = pg_array([c.id for c in claimed])
            rejected: list[Any] = []
            if any(i.filtered for i in inputs):
                # the events' payloads, read only when a consuming input has a `where`
                by_src: dict[tuple[str, int, str], list[EventRow]] = {}
                for e in await fetch_named(
                    cur, EventRow, Q["claimed_event_payloads"], {"ids": ids}
                ):
                    by_src.setdefault(e.src, []).append(e)
                rejected = [r for i in inputs for r in i.rejected(by_src)]
            grants = await read_grants(cur, ((i.dag_id, i.version, i.job) for i in inputs))
            # the kernel's decision per number of tries (announcements are nearly all at 0)
            sent = [
                {"from_tries": t, "state": d.state.value, "tries": d.tries}
                for t in sorted({c.tries for c in claimed})
                if (d := outbox_sm.decide_sent(outbox_sm.OutboxState.PENDING, t))
            ]
            state = lifecycle.decide_create(delay_s=0)
            (out,) = await _fetch_prepared(
                cur,
                FanOutRow,
                Q["fan_out"],
                {
                    "ids": ids,
                    "sent": Jsonb(sent),
                    "inputs": Jsonb(
                        [i.grant(grants[(i.dag_id, i.version, i.job)]) for i in inputs]
                    ),
                    "rejected": Jsonb(rejected),
                    "state": state.value,
                    "wake": self.wake_mode == "queue" and state is TaskState.QUEUED,
                    "wake_topic": WAKE_TOPIC,
                    "invoke_topic": INVOKE_TOPIC,
                },
            )
            if out.unplanned:
                # a DAG reading these events was deployed after fan_out_inputs read: plan
                # again (a concurrent creator of one of the tasks fails the statement itself)
                raise errors.Conflict("the fan-out pass raced a deploy or a creator; try again")
            if out.created and state is TaskState.QUEUED:
                await cur.execute(
                    TASK_Q["notify_outbox" if self.wake_mode == "queue" else "notify_tasks"]
                )
        return FanOutReport(events=out.consumed, created=out.created, held=out.held)

    async def fan_out_until_idle(self, batch: int = DEFAULT_BATCH) -> FanOutReport:
        """Fan-out passes (``fan_out_once``) while they find announcements: a backlog drains
        pass after pass, not one pass per poll. Returns the passes' totals."""
        events = created = held = 0
        while True:
            report = await self.fan_out_once(batch)
            events, created, held = (
                events + report.events,
                created + report.created,
                held + report.held,
            )
            if not (report.events or report.held):
                return FanOutReport(events=events, created=created, held=held)

    async def run(
        self, stop: asyncio.Event, *, fan_out_every_s: float = 0.2, schedule_every_s: float = 1.0
    ) -> None:
        """The DAG passes until ``stop`` is set (``run_every``: failures are logged and retried
        with backoff): fan-out, schedules, cutovers of complete rebuilds
        (``trace_lite.dag_remat``) and invalidation cascades (``trace_lite.dag_invalidations``).

        The fan-out drains what is announced (``fan_out_until_idle``), then waits for
        ``NOTIFY trace_dag_events`` (migration 0032: sent at the commit of every statement that
        announces events) or ``fan_out_every_s``, whichever comes first."""
        remat = DagRemat(self.pool)
        invalidations = Invalidations(self.pool, wake_mode=self.wake_mode, orgs=self.orgs)
        await asyncio.gather(
            run_woken(
                stop,
                self.pool.conninfo,
                EVENTS_CHANNEL,
                fan_out_every_s,
                self.fan_out_until_idle,
                name="dag fan-out",
                logger=log,
            ),
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


async def _fetch_prepared(
    cur: psycopg.AsyncCursor[Any], cls: type[R], query: str, params: Mapping[str, Any]
) -> list[R]:
    """``fetch_as`` with ``query`` prepared on the connection at its first use (the fan-out's
    statements are large: planned a few times per connection, not once per pass)."""
    async with cur.connection.cursor(row_factory=class_row(cls)) as named:
        await named.execute(query, params, prepare=True)
        return await named.fetchall()


def _within(
    produced: Sequence[tuple[AnnouncementRow, list[tuple[str, int, str]]]],
    inputs: Sequence[ConsumerInputRow],
    tasks: int,
) -> list[AnnouncementRow]:
    """The first locked announcements (``produced``: each with what its events were produced
    on) whose estimated tasks (each event times the consuming inputs of what it was produced
    on) fit ``tasks``; at least one."""
    reach: Counter[tuple[str, int, str]] = Counter()
    for i in inputs:
        reach.update((t, o, k) for t, o, k in json.loads(i.srcs))
    taken: list[AnnouncementRow] = []
    total = 0
    for c, on in produced:
        n = c.events * sum(reach[src] for src in on)
        if taken and total + n > tasks:
            break
        taken.append(c)
        total += n
    return taken


def _unique(tasks: list[NewTask]) -> list[NewTask]:
    """One task per (org, idempotency key): two triggers of a job firing the same slot."""
    seen: dict[tuple[str, str], NewTask] = {}
    for t in tasks:
        seen.setdefault((t.org_id, t.idempotency_key), t)
    return list(seen.values())


__all__ = [
    "EVENTS_CHANNEL",
    "EVENT_TOPIC",
    "DagRuns",
    "FanOutReport",
    "NewTask",
    "create_dag_tasks",
    "latest_slot",
]
