"""Running deployed DAGs on real Postgres: manual triggers as durable runs, events of DAG tasks
fanned out to one task per consuming job (inside the DAG and across DAGs through a published
dataset), created once however often or concurrently the pass runs, consumed in the
transaction that creates the tasks; cron and interval schedules fired once per slot."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import attrs
import pytest

from pg_sql import sql
from trace_core import errors, wire
from trace_core.testing import MemoryObjectStore, MemoryQueue, MemorySigner
from trace_lite.dag_runs import DagRuns, latest_slot
from trace_lite.dags import Dags
from trace_lite.datasets import Datasets
from trace_lite.dispatcher import Dispatcher, open_pool
from trace_servers.dag_cli import builtin_operators

ORG = "acme"
OUT = {"storage": "object_store", "update_strategy": "append"}

FLOW: dict[str, Any] = {
    "name": "flow",
    "jobs": {
        "src": {"operator": "emit_events", "triggers": [{"type": "manual"}], "outputs": [OUT]},
        "a": {"operator": "noop", "config": {"k": 1}, "inputs": [{"from": {"job": "src"}}]},
        "b": {"operator": "noop", "inputs": [{"from": {"job": "src"}}], "outputs": [OUT]},
        "c": {"operator": "noop", "inputs": [{"from": {"job": "b"}}]},
    },
    "publish": [{"job": "src", "output": 0, "dataset": "raw"}],
}
DOWN: dict[str, Any] = {
    "name": "down",
    "jobs": {"d": {"operator": "noop", "inputs": [{"from": {"dataset": "raw"}}]}},
}


@attrs.define
class World:
    d: Dispatcher
    dags: Dags
    runs: DagRuns
    ds: Datasets
    db_url: str
    queue: MemoryQueue

    def sql(self, query: str, params: Any = None) -> list[tuple[Any, ...]]:
        return sql(self.db_url, query, params)

    def tasks_of(self, job: str) -> list[tuple[Any, ...]]:
        return self.sql(
            "SELECT task_id::text, dag_version, payload FROM tasks WHERE dag_job = %s "
            "ORDER BY created_at, task_id",
            [job],
        )


@pytest.fixture
async def world(db_url: str) -> AsyncIterator[World]:
    pool = await open_pool(db_url, min_size=2, max_size=12)
    queue = MemoryQueue("t")
    d = Dispatcher(pool, signer=MemorySigner(), queue=queue, object_store=MemoryObjectStore())
    ds = Datasets(pool, object_store=MemoryObjectStore())
    await ds.set_member(None, ORG, "bob", [])
    dags = Dags(pool, operators=builtin_operators())
    await dags.deploy(None, ORG, FLOW)
    await dags.deploy(None, ORG, DOWN)
    try:
        yield World(d, dags, DagRuns(pool), ds, db_url, queue)
    finally:
        await pool.close()


async def _run_source(w: World, events: list[dict[str, Any]], final: list[dict[str, Any]]) -> str:
    """Trigger ``src``, claim it, emit ``events`` mid-attempt and complete with ``final``."""
    out = await w.runs.trigger(None, ORG, "flow", "src")
    c = await w.d.claim(out["task_id"])
    fence = {"task_id": c.task_id, "attempt": c.attempt, "lease_token": c.lease_token}
    await w.d.emit_events(wire.EventsRequest(**fence, events=[wire.EventIn(**e) for e in events]))
    await w.d.complete(
        wire.CompleteRequest(**fence, final_events=[wire.EventIn(**e) for e in final])
    )
    return str(out["task_id"])


async def test_trigger_is_a_durable_run(world: World) -> None:
    first = await world.runs.trigger(None, ORG, "flow", "src", payload={"n": 2}, run_id="run-1")
    assert (first["created"], first["version"], first["run_id"]) == (True, 1, "run-1")
    again = await world.runs.trigger(None, ORG, "flow", "src", payload={"n": 9}, run_id="run-1")
    assert (again["task_id"], again["created"]) == (first["task_id"], False)
    ((task_id, version, payload),) = world.tasks_of("src")
    assert (task_id, version, payload) == (first["task_id"], 1, {"n": 2})
    (row,) = world.sql(
        "SELECT t.state, t.operator, t.idempotency_key, g.name FROM tasks t "
        "JOIN dags g USING (dag_id) WHERE t.task_id = %s",
        [task_id],
    )
    assert row == ("queued", "emit_events", "flow:src:run-1", "flow")
    # the task is woken like any other
    assert world.sql("SELECT count(*) FROM outbox WHERE topic = 'wake'") == [(1,)]
    # a new run without an id is a new task
    other = await world.runs.trigger(None, ORG, "flow", "src")
    assert other["created"] and other["task_id"] != first["task_id"]


async def test_trigger_refusals(world: World) -> None:
    with pytest.raises(errors.ValidationFailed) as info:
        await world.runs.trigger(None, ORG, "flow", "a")
    assert info.value.field == "job"
    with pytest.raises(errors.NotFound):
        await world.runs.trigger(None, ORG, "flow", "nope")
    with pytest.raises(errors.NotFound):
        await world.runs.trigger(None, ORG, "nope", "src")
    bob = await world.dags.user_caller(ORG, "bob")
    with pytest.raises(errors.Forbidden):
        await world.runs.trigger(bob, ORG, "flow", "src")
    # a caller of another org learns nothing, not even whether the DAG exists
    await world.ds.set_member(None, "globex", "eve", ["admin"])
    eve = await world.dags.user_caller("globex", "eve")
    for dag in ("flow", "nope"):
        with pytest.raises(errors.NotFound) as info:
            await world.runs.trigger(eve, ORG, dag, "src")
        assert info.value.field == "org"
    no_manual = {**FLOW, "jobs": {**FLOW["jobs"]}}
    no_manual["jobs"]["src"] = {
        **FLOW["jobs"]["src"],
        "triggers": [{"type": "interval", "every": 60}],
    }
    await world.dags.deploy(None, ORG, no_manual)
    with pytest.raises(errors.ValidationFailed):
        await world.runs.trigger(None, ORG, "flow", "src")
    assert world.sql("SELECT count(*) FROM tasks") == [(0,)]
    # a triggerer of the DAG may trigger it (with a manual trigger back)
    await world.dags.deploy(None, ORG, FLOW)
    await world.ds.ensure_dag(ORG, "flow", triggerers=["bob"])
    bob = await world.dags.user_caller(ORG, "bob")
    assert (await world.runs.trigger(bob, ORG, "flow", "src"))["created"]


async def test_one_event_one_task_per_consumer_created_once(world: World) -> None:
    producer = await _run_source(
        world,
        [{"key": "r-0", "type": "range", "payload": {"start": 0, "end": 10}}],
        [{"key": "done", "type": "done", "payload": {}}],
    )
    # nothing fans out before a pass runs: the announcements wait, pending
    assert world.sql(
        "SELECT count(*) FROM outbox WHERE topic = 'dag.event' AND state = 'pending'"
    ) == [(2,)]
    report = await world.runs.fan_out_once()
    # 2 events x 3 consumers (a and b in flow, d in down reading the published dataset)
    assert (report.events, report.created) == (2, 6)
    assert world.sql(
        "SELECT dag_job, count(*) FROM tasks WHERE dag_job IN ('a', 'b', 'd') "
        "GROUP BY dag_job ORDER BY dag_job"
    ) == [("a", 2), ("b", 2), ("d", 2)]
    payloads = sorted((p["event"]["key"], p["k"]) for _, _, p in world.tasks_of("a"))
    assert payloads == [("done", 1), ("r-0", 1)]
    (range_task,) = [p for _, _, p in world.tasks_of("b") if p["event"]["key"] == "r-0"]
    assert range_task["event"] == {
        "producer_task_id": producer,
        "key": "r-0",
        "type": "range",
        "payload": {"start": 0, "end": 10},
        "output": 0,
        "input": 0,
    }
    # lineage: each task names its event and the published dataset it reads
    lineage = world.sql(
        "SELECT t.dag_job, i.producer_task_id::text, i.event_key, d.name "
        "FROM task_inputs i JOIN tasks t USING (task_id) "
        "LEFT JOIN datasets d ON d.dataset_uuid = i.dataset_uuid ORDER BY 1, 3"
    )
    assert lineage == [
        ("a", producer, "done", "raw"),
        ("a", producer, "r-0", "raw"),
        ("b", producer, "done", "raw"),
        ("b", producer, "r-0", "raw"),
        ("d", producer, "done", "raw"),
        ("d", producer, "r-0", "raw"),
    ]
    # ... and the version of it the producing DAG's active pointer set names
    (active,) = world.sql(
        "SELECT p.dataset_version FROM dag_pointers p JOIN dags g ON g.dag_id = p.dag_id "
        "AND g.active_generation = p.generation JOIN datasets d USING (dataset_uuid) "
        "WHERE d.name = 'raw'"
    )
    assert world.sql("SELECT DISTINCT dataset_version FROM task_inputs") == [active]
    assert world.sql("SELECT state, count(*) FROM outbox WHERE topic = 'dag.event' GROUP BY 1") == [
        ("published", 2)
    ]
    # a second pass finds nothing; re-announcing the same events creates nothing again
    assert (await world.runs.fan_out_once()).events == 0
    world.sql("UPDATE outbox SET state = 'pending' WHERE topic = 'dag.event'")
    again = await world.runs.fan_out_once()
    assert (again.events, again.created) == (2, 0)
    assert world.sql("SELECT count(*) FROM tasks WHERE dag_job IN ('a', 'b', 'd')") == [(6,)]
    assert world.sql("SELECT count(*) FROM task_inputs") == [(6,)]
    # a retried attempt re-emitting a key announces nothing new (dedupe by producer + key)
    events = world.sql("SELECT count(*) FROM outbox WHERE topic = 'dag.event'")
    assert events == [(2,)]


async def test_downstream_of_downstream_and_concurrent_passes(world: World) -> None:
    await _run_source(
        world, [{"key": f"r-{i}", "type": "range", "payload": {"i": i}} for i in range(20)], []
    )
    # one pass per announcement batch, many at once: SKIP LOCKED plus the idempotency key
    reports = await asyncio.gather(*(world.runs.fan_out_once(batch=3) for _ in range(8)))
    while (more := await world.runs.fan_out_once(batch=3)).events:
        reports.append(more)
    assert sum(r.events for r in reports) == 20
    assert sum(r.created for r in reports) == 60
    # b's tasks emit events in turn: c consumes them
    (b_task,) = [t for t, _, p in world.tasks_of("b") if p["event"]["key"] == "r-0"]
    c = await world.d.claim(b_task)
    fence = {"task_id": c.task_id, "attempt": c.attempt, "lease_token": c.lease_token}
    await world.d.complete(
        wire.CompleteRequest(**fence, final_events=[wire.EventIn(key="x", type="row")])
    )
    a_task = next(t for t, _, p in world.tasks_of("a") if p["event"]["key"] == "r-0")
    c = await world.d.claim(a_task)
    fence = {"task_id": c.task_id, "attempt": c.attempt, "lease_token": c.lease_token}
    await world.d.complete(
        wire.CompleteRequest(**fence, final_events=[wire.EventIn(key="x", type="row")])
    )
    report = await world.runs.fan_out_once()
    # a has no consumers: its event is consumed with no task; b's event makes one c task
    assert (report.events, report.created) == (2, 1)
    ((c_task, _, payload),) = world.tasks_of("c")
    assert payload["event"]["producer_task_id"] == b_task
    (lineage,) = world.sql("SELECT dataset_uuid FROM task_inputs WHERE task_id = %s", [c_task])
    assert lineage == (None,)  # b's output is not published


async def test_an_event_is_not_consumed_without_its_tasks(world: World) -> None:
    await _run_source(world, [{"key": "r-0", "type": "range", "payload": {}}], [])
    # Make creating a's task fail inside the pass: the whole pass rolls back.
    world.sql(
        "ALTER TABLE tasks ADD CONSTRAINT no_a CHECK (dag_job IS DISTINCT FROM 'a') NOT VALID"
    )
    with pytest.raises(errors.ValidationFailed):
        await world.runs.fan_out_once()
    assert world.sql("SELECT state FROM outbox WHERE topic = 'dag.event'") == [("pending",)]
    assert world.sql("SELECT count(*) FROM tasks WHERE dag_job IN ('b', 'd')") == [(0,)]
    world.sql("ALTER TABLE tasks DROP CONSTRAINT no_a")
    assert (await world.runs.fan_out_once()).created == 3


async def test_tasks_outside_dags_announce_nothing(world: World) -> None:
    (info,) = await world.d.create_tasks([wire.CreateTaskRequest(operator="noop", org=ORG)])
    c = await world.d.claim(info.task_id)
    fence = {"task_id": c.task_id, "attempt": c.attempt, "lease_token": c.lease_token}
    await world.d.complete(
        wire.CompleteRequest(**fence, final_events=[wire.EventIn(key="e", type="t")])
    )
    assert world.sql("SELECT count(*) FROM outbox WHERE topic = 'dag.event'") == [(0,)]


def test_latest_slot() -> None:
    at = datetime(2026, 5, 4, 10, 7, 30, tzinfo=UTC)
    assert latest_slot({"type": "cron", "schedule": "*/5 * * * *"}, at) == at.replace(
        minute=5, second=0
    )
    on_slot = at.replace(minute=10, second=0)
    assert latest_slot({"type": "cron", "schedule": "*/5 * * * *"}, on_slot) == on_slot
    assert latest_slot({"type": "interval", "every": 60}, at) == at.replace(second=0)
    assert latest_slot({"type": "manual"}, at) is None


async def test_schedules_fire_each_slot_once(world: World) -> None:
    sched = {**FLOW, "name": "ticks", "publish": []}
    sched["jobs"] = {
        "tick": {
            "operator": "noop",
            "config": {"c": 1},
            "triggers": [
                {"type": "interval", "every": 3600},
                {"type": "cron", "schedule": "@daily"},
            ],
        }
    }
    await world.dags.deploy(None, ORG, sched)
    # Deployed now: this hour's and today's slots began before the deploy, so nothing fires.
    assert await world.runs.schedule_once() == 0
    # Pretend the version was deployed yesterday: both slots are due, each fires once.
    world.sql(
        "ALTER TABLE dag_versions DISABLE TRIGGER dag_versions_immutable;"
        "UPDATE dag_versions v SET created_at = now() - interval '2 days' "
        "FROM dags g WHERE g.dag_id = v.dag_id AND g.name = 'ticks';"
        "ALTER TABLE dag_versions ENABLE TRIGGER dag_versions_immutable;"
    )
    results = await asyncio.gather(*(world.runs.schedule_once() for _ in range(4)))
    rows = world.sql("SELECT idempotency_key, payload FROM tasks WHERE dag_job = 'tick'")
    # this hour's slot and today's (one slot when the hour is midnight), each created once
    assert sum(results) == len(rows) and 1 <= len(rows) <= 2
    assert await world.runs.schedule_once() == 0
    for key, payload in rows:
        assert key.startswith("ticks:tick:")
        slot = datetime.fromisoformat(key.removeprefix("ticks:tick:"))
        assert (slot.minute, slot.second, slot.tzinfo) == (0, 0, UTC)
        assert payload == {"c": 1, "scheduled_time": slot.isoformat()}


async def test_where_filters_the_events_a_consumer_gets(world: World) -> None:
    ranged = {**OUT, "schema": {"start": "uint64", "end": "uint64"}}
    spec: dict[str, Any] = {
        "name": "filtered",
        "jobs": {
            "src": {"operator": "noop", "triggers": [{"type": "manual"}], "outputs": [ranged]},
            "late": {
                "operator": "noop",
                "inputs": [{"from": {"job": "src"}, "where": {"start": {"gte": 10}}}],
            },
            "all": {"operator": "noop", "inputs": [{"from": {"job": "src"}}]},
        },
    }
    await world.dags.deploy(None, ORG, spec)
    out = await world.runs.trigger(None, ORG, "filtered", "src")
    c = await world.d.claim(out["task_id"])
    fence = {"task_id": c.task_id, "attempt": c.attempt, "lease_token": c.lease_token}
    events = [
        wire.EventIn(key="a", type="range", payload={"start": 0, "end": 10}),
        wire.EventIn(key="b", type="range", payload={"start": 10, "end": 20}),
        wire.EventIn(key="c", type="done", payload={"n": 2}),  # carries no start: passes
    ]
    await world.d.complete(wire.CompleteRequest(**fence, final_events=events))
    report = await world.runs.fan_out_once()
    assert (report.events, report.created) == (3, 5)
    late = sorted(p["event"]["key"] for _, _, p in world.tasks_of("late"))
    assert late == ["b", "c"]
    assert len(world.tasks_of("all")) == 3
    # every announcement is consumed, the filtered ones with no task
    assert world.sql(
        "SELECT count(*) FROM outbox WHERE topic = 'dag.event' AND state = 'pending'"
    ) == [(0,)]
