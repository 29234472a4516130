"""Rematerialization: a deploy that changes what jobs compute rebuilds them beside the live
version, then cuts over in one transaction.

A deploy whose diff has a materialization-affecting change (``trace_core.dag.affected_jobs``:
the edited jobs and their transitive downstream, the *rebuild* set) does not activate its
version. In the deploy's transaction, ``stage``:

1. registers the staged spec's new dataset names (existing ones keep their live metadata);
2. opens a new ``dataset_version`` for every dataset a rebuilt job publishes (and a first one
   for new names) and records a **staged pointer set**: a generation overlaying the active one
   with them, while ``dags.active_generation`` does not move -- readers keep resolving the old
   versions, stale but consistent;
3. records the staging (``dag_rematerializations``, state ``building``; migration 0018);
4. replays the rebuilt jobs' inputs into the staged version: every event the producers feeding
   the rebuild from outside it ever recorded (unaffected jobs, other DAGs' datasets) becomes a
   task of the staged consuming job, and every past run of a rebuilt source job is run again
   (its payload with the new config). Staged tasks commit through the staged pointer set
   (``trace_lite.outputs``) and their events reach only staged jobs (``dags.sql``
   ``fan_out_plan``), so the rebuild flows down the rebuilt jobs.

While the staging builds, new events for rebuilt jobs **wait**: the fan-out holds an
announcement with a staged consumer (``available_at = 'infinity'``) and creates its other
consumers' tasks; triggers and schedules of a rebuilt source job run in the staged version.

``DagRemat.cutover_once`` (every second, in every Dispatcher's DAG passes) finds stagings whose
every task completed and whose events were all fanned out and, in **one transaction** under the
DAG row's lock: moves ``active_version`` and ``active_generation`` to the staged pair (a new
overlay of the current active set when it moved meanwhile), updates the registry to the staged
spec's publish list, records the activation (reason ``cutover``: ``trace dag rollback``
restores the pair before), cancels the rebuilt jobs' unfinished work of older versions (their
inputs were replayed), and makes the held announcements due: they drain against the new
version, once each -- a replayed event and the same event drained make one task (the
idempotency key carries the job's epoch, ``trace_lite.dag_tasks``) -- and an event of a rebuilt
job's old task reaches nothing of its DAG.

A failed or canceled staged task holds the cutover (``trace dag status`` shows it). A later
deploy, or ``trace dag rollback``, **abandons** a building staging (``abandon``): its
unfinished tasks are canceled, its state is ``abandoned``, the held announcements drain
against the active version, and its events reach nothing.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from collections.abc import Mapping
from typing import Any, Final

import attrs
import psycopg
from psycopg_pool import AsyncConnectionPool

from trace_core import errors
from trace_core.dag import Dag
from trace_core.lifecycle import TRANSITIONS, TaskEvent, TaskState
from trace_lite import sqlfile
from trace_lite.dag_grants import PLATFORM
from trace_lite.dag_registry import register_published, register_version
from trace_lite.dag_tasks import NewTask, PlanRow, create_dag_tasks, insert_lineage, with_epoch
from trace_lite.pg import fetch_as, transaction
from trace_lite.task_rows import WakeMode
from trace_sdk.aio import run_every

log = logging.getLogger("trace.dag_remat")

Q = sqlfile.load("dag_remat.sql")
DQ = sqlfile.load("datasets.sql")
VQ = sqlfile.load("dags.sql")

#: The states a cancel moves to ``canceled``, as the kernel's transition table says.
CANCELABLE: Final = tuple(
    sorted(s.value for (s, e), target in TRANSITIONS.items() if e is TaskEvent.CANCEL)
)


@attrs.frozen
class Staging:
    """A building staging of a DAG."""

    version: int
    from_version: int
    generation: int
    rebuild: list[str]


@attrs.frozen
class Staged:
    """What ``stage`` did."""

    version: int
    generation: int
    rebuild: list[str]
    #: Tasks the replay created (0: the rebuild is complete at once; the next pass cuts over).
    tasks: int


@attrs.frozen
class CutOver:
    dag_id: str
    version: int
    from_version: int
    generation: int
    #: Old unfinished tasks of the rebuilt jobs canceled, by the state they were in.
    canceled: dict[str, int]


@attrs.frozen
class _UuidRow:
    dataset_uuid: str


@attrs.frozen
class _GenerationRow:
    generation: int


@attrs.frozen
class _ParentRow:
    parent_generation: int | None


@attrs.frozen
class _PointerRow:
    dataset_uuid: str
    dataset_version: str


@attrs.frozen
class _ReadyRow:
    dag_id: str
    version: int
    from_version: int
    generation: int
    rebuild: list[str]


@attrs.frozen
class _LockedRow:
    dag_id: str
    org_id: str
    active_version: int | None
    active_generation: int | None


@attrs.frozen
class _RunRow:
    base: str
    org_id: str
    job: str
    payload: str
    old_config: str
    operator: str
    runtime: str
    config: str
    timeout_s: int
    max_attempts: int


@attrs.frozen
class _WasRow:
    was: str


@attrs.frozen
class _VersionRow:
    active_version: int


@attrs.frozen
class _CountRow:
    job: str
    state: str | None
    n: int


@attrs.frozen
class _NRow:
    n: int


def _by_state(rows: list[_WasRow]) -> dict[str, int]:
    return dict(sorted(Counter(r.was for r in rows).items()))


async def building(cur: psycopg.AsyncCursor[Any], dag_id: str) -> Staging | None:
    """The DAG's building staging, if any."""
    rows = await fetch_as(cur, Staging, Q["building"], {"dag_id": dag_id})
    return rows[0] if rows else None


def rerun_payload(
    old_payload: Mapping[str, Any], old_config: Mapping[str, Any], config: Mapping[str, Any]
) -> dict[str, Any]:
    """A replayed source run's payload: the new ``config`` with what the run added over its
    old config (a trigger's payload, ``scheduled_time``) merged over it."""
    added = {k: v for k, v in old_payload.items() if k not in old_config or old_config[k] != v}
    return {**config, **added}


async def stage(
    cur: psycopg.AsyncCursor[Any],
    *,
    org_id: str,
    dag_id: str,
    dag: Dag,
    version: int,
    from_version: int,
    active_generation: int | None,
    rebuild: list[str],
    created_by: str,
    wake_mode: WakeMode,
) -> Staged:
    """Stage ``version`` (stored, not active) of DAG ``dag_id`` to rebuild ``rebuild``, in the
    deploy's transaction under the DAG row's lock (see the module docstring). Raises
    ``Conflict`` (a published name another DAG took)."""
    await register_published(cur, org_id, dag_id, dag, new_only=True)
    params = {
        "dag_id": dag_id,
        "names": [p.dataset for p in dag.publish],
        "jobs": [p.job for p in dag.publish],
        "rebuild": rebuild,
    }
    uuids = [
        r.dataset_uuid for r in await fetch_as(cur, _UuidRow, Q["datasets_to_version"], params)
    ]
    opened = await fetch_as(cur, _PointerRow, Q["insert_versions"], {"uuids": uuids})
    new = {p.dataset_uuid: p.dataset_version for p in opened}
    versions = [new[u] for u in uuids]
    (gen,) = await fetch_as(
        cur,
        _GenerationRow,
        Q["insert_staged_pointer_set"],
        {
            "dag_id": dag_id,
            "parent": active_generation,
            "created_by": created_by,
            "dataset_uuids": uuids,
            "versions": versions,
        },
    )
    await cur.execute(
        Q["insert_staging"],
        {
            "dag_id": dag_id,
            "version": version,
            "from_version": from_version,
            "generation": gen.generation,
            "rebuild": rebuild,
            "created_by": created_by,
        },
    )
    created = await _replay(cur, dag_id, dag, version, rebuild, wake_mode)
    return Staged(version, gen.generation, rebuild, created)


async def _replay(
    cur: psycopg.AsyncCursor[Any],
    dag_id: str,
    dag: Dag,
    version: int,
    rebuild: list[str],
    wake_mode: WakeMode,
) -> int:
    """Create the staged tasks that rebuild ``rebuild``: replayed events and source runs."""
    params = {"dag_id": dag_id, "version": version, "rebuild": rebuild}
    plan = [p for p in await fetch_as(cur, PlanRow, Q["replay_events"], params) if p.passes_where()]
    tasks = [p.new_task() for p in plan]
    sources = [j for j in rebuild if dag.jobs[j].is_source]
    runs: list[NewTask] = []
    if sources:
        params = {"dag_id": dag_id, "version": version, "sources": sources}
        for r in await fetch_as(cur, _RunRow, Q["replay_runs"], params):
            payload = rerun_payload(
                json.loads(r.payload), json.loads(r.old_config), json.loads(r.config)
            )
            runs.append(
                NewTask(
                    org_id=r.org_id,
                    dag_id=dag_id,
                    version=version,
                    job=r.job,
                    operator=r.operator,
                    runtime=r.runtime,
                    timeout_s=r.timeout_s,
                    max_attempts=r.max_attempts,
                    payload=payload,
                    idempotency_key=with_epoch(r.base, version),
                )
            )
    created = await create_dag_tasks(cur, [*tasks, *runs], wake_mode)
    lineage = [(t.task_id, p) for t, p in zip(tasks, plan, strict=True) if t.task_id in created]
    await insert_lineage(cur, lineage)
    return len(created)


async def abandon(cur: psycopg.AsyncCursor[Any], dag_id: str) -> dict[str, Any] | None:
    """End the DAG's building staging as ``abandoned``, in the caller's transaction under the
    DAG row's lock: cancel its unfinished tasks and make the held announcements due. Returns
    ``{version, canceled: {state: n}}``, or None when nothing was building."""
    staging = await building(cur, dag_id)
    if staging is None:
        return None
    params = {"dag_id": dag_id, "version": staging.version, "state": "abandoned"}
    await cur.execute(Q["end_staging"], params)
    canceled = await fetch_as(
        cur,
        _WasRow,
        Q["cancel_jobs_except"],
        {
            "dag_id": dag_id,
            "states": list(CANCELABLE),
            "jobs": staging.rebuild,
            "version": staging.version,
            "version_only": True,
        },
    )
    await cur.execute(Q["release_held"])
    return {"version": staging.version, "canceled": _by_state(canceled)}


async def status(cur: psycopg.AsyncCursor[Any], dag_id: str) -> dict[str, Any] | None:
    """The building staging's progress: ``{version, from_version, generation, rebuild, jobs:
    {job: {state: n}}, waiting_events, blocked}`` (``blocked``: a staged task failed or was
    canceled, which holds the cutover); None when nothing is building."""
    staging = await building(cur, dag_id)
    if staging is None:
        return None
    jobs: dict[str, dict[str, int]] = {}
    params = {"dag_id": dag_id, "version": staging.version, "rebuild": staging.rebuild}
    for r in await fetch_as(cur, _CountRow, Q["staging_counts"], params):
        counts = jobs.setdefault(r.job, {s.value: 0 for s in TaskState})
        if r.state is not None:
            counts[r.state] = r.n
    (waiting,) = await fetch_as(cur, _NRow, Q["waiting_events"], {"dag_id": dag_id})
    blocked = any(c["failed"] or c["canceled"] for c in jobs.values())
    return {
        **attrs.asdict(staging),
        "jobs": jobs,
        "waiting_events": waiting.n,
        "blocked": blocked,
    }


class DagRemat:
    """The cutover pass over the stagings of one Postgres state database."""

    def __init__(self, pool: AsyncConnectionPool) -> None:
        self.pool = pool

    async def cutover_once(self) -> list[CutOver]:
        """Cut over every staging whose rebuild is complete, each in its own transaction (see
        the module docstring). Returns what was cut over."""
        async with transaction(self.pool) as cur:
            ready = await fetch_as(cur, _ReadyRow, Q["ready"], {"dag_id": None})
        done = []
        for r in ready:
            try:
                async with transaction(self.pool) as cur:
                    cut = await _cut_over(cur, r.dag_id)
            except errors.Conflict as exc:  # pragma: no cover - a deploy raced the pass
                log.info("cutover of %s deferred: %s", r.dag_id, exc.message)
                continue
            if cut is not None:
                done.append(cut)
        return done

    async def run(self, stop: asyncio.Event, *, every_s: float = 1.0) -> None:
        """``cutover_once`` until ``stop`` is set (``run_every``: failures logged, retried)."""
        await run_every(stop, every_s, self.cutover_once, name="dag cutovers", logger=log)


async def _cut_over(cur: psycopg.AsyncCursor[Any], dag_id: str) -> CutOver | None:
    (dag,) = await fetch_as(cur, _LockedRow, Q["lock_dag_by_id"], {"dag_id": dag_id})
    rows = await fetch_as(cur, _ReadyRow, Q["ready"], {"dag_id": dag_id})
    if not rows:
        return None  # ended or not ready any more, seen under the lock
    r = rows[0]
    await register_version(cur, dag.org_id, dag_id, r.version)
    params = {"dag_id": dag_id, "generation": r.generation}
    (parent,) = await fetch_as(cur, _ParentRow, Q["parent_generation"], params)
    generation = r.generation
    if parent.parent_generation != dag.active_generation:
        # the active set moved while the staging built: overlay the new versions on it
        params = {"dag_id": dag_id, "generation": r.generation, "parent": parent.parent_generation}
        new = await fetch_as(cur, _PointerRow, Q["staged_pointers"], params)
        overlay = {
            "dag_id": dag_id,
            "expected": dag.active_generation,
            "created_by": PLATFORM,
            "dataset_uuids": [p.dataset_uuid for p in new],
            "versions": [p.dataset_version for p in new],
        }
        (gen,) = await fetch_as(cur, _GenerationRow, DQ["insert_pointer_set"], overlay)
        generation = gen.generation
    params = {
        "dag_id": dag_id,
        "version": r.version,
        "generation": generation,
        "expected_version": dag.active_version,
        "expected_generation": dag.active_generation if generation == r.generation else generation,
    }
    if not await fetch_as(cur, _VersionRow, Q["go_live"], params):
        raise errors.Conflict("the DAG changed concurrently")
    await cur.execute(
        Q["end_staging"], {"dag_id": dag_id, "version": r.version, "state": "cut_over"}
    )
    await cur.execute(Q["record_cutover"], {"dag_id": dag_id, "created_by": PLATFORM})
    canceled = await fetch_as(
        cur,
        _WasRow,
        Q["cancel_jobs_except"],
        {
            "dag_id": dag_id,
            "states": list(CANCELABLE),
            "jobs": r.rebuild,
            "version": r.version,
            "version_only": False,
        },
    )
    await cur.execute(Q["release_held"])
    return CutOver(dag_id, r.version, r.from_version, generation, _by_state(canceled))


__all__ = [
    "CANCELABLE",
    "CutOver",
    "DagRemat",
    "Staged",
    "Staging",
    "abandon",
    "building",
    "rerun_payload",
    "stage",
    "status",
]
