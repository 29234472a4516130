"""The set-based DAG fan-out on real Postgres: one wake-up row per pass still wakes every task
it created (one queue message each); a pass that races the deploy of a consuming DAG, or loses
one of its keys to a concurrent creator, rolls back whole (nothing consumed, nothing created)
and the next pass creates what is still missing."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import attrs
import psycopg
import pytest

from pg_sql import sql
from trace_core import errors, wire
from trace_core.outbox import OutboxPolicy
from trace_core.testing import MemoryObjectStore, MemoryQueue, MemorySigner
from trace_lite import dag_runs
from trace_lite.dag_runs import DagRuns
from trace_lite.dags import Dags
from trace_lite.dispatcher import Dispatcher, open_pool
from trace_lite.outbox_publisher import OutboxPublisher
from trace_sdk import parse_wakeup
from trace_servers.dag_cli import builtin_operators
from waiting import wait_until

ORG = "acme"
OUT = {"storage": "object_store", "update_strategy": "append"}

FLOW: dict[str, Any] = {
    "name": "flow",
    "jobs": {
        "src": {"operator": "noop", "triggers": [{"type": "manual"}], "outputs": [OUT]},
        "a": {"operator": "noop", "inputs": [{"from": {"job": "src"}}]},
        "b": {"operator": "noop", "inputs": [{"from": {"job": "src"}}]},
    },
    "publish": [{"job": "src", "output": 0, "dataset": "raw"}],
}
LATE: dict[str, Any] = {
    "name": "late",
    "jobs": {"d": {"operator": "noop", "inputs": [{"from": {"dataset": "raw"}}]}},
}


@attrs.define
class World:
    d: Dispatcher
    dags: Dags
    runs: DagRuns
    db_url: str

    def sql(self, query: str, params: Any = None) -> list[tuple[Any, ...]]:
        return sql(self.db_url, query, params)


@pytest.fixture
async def world(db_url: str) -> AsyncIterator[World]:
    pool = await open_pool(db_url, min_size=2, max_size=8)
    d = Dispatcher(
        pool, signer=MemorySigner(), queue=MemoryQueue("t"), object_store=MemoryObjectStore()
    )
    dags = Dags(pool, operators=builtin_operators())
    await dags.deploy(None, ORG, FLOW)
    try:
        yield World(d, dags, DagRuns(pool), db_url)
    finally:
        await pool.close()


async def _run_source(w: World, keys: list[str]) -> str:
    out = await w.runs.trigger(None, ORG, "flow", "src")
    c = await w.d.claim(out["task_id"])
    fence = {"task_id": c.task_id, "attempt": c.attempt, "lease_token": c.lease_token}
    events = [wire.EventIn(key=k, type="range", payload={"start": i}) for i, k in enumerate(keys)]
    await w.d.complete(wire.CompleteRequest(**fence, final_events=events))
    return str(out["task_id"])


async def test_one_wake_up_row_per_pass_wakes_every_task(world: World) -> None:
    await _run_source(world, ["r-0", "r-1", "r-2"])
    before = world.sql("SELECT coalesce(max(id), 0) FROM outbox WHERE topic = 'wake'")[0][0]
    report = await world.runs.fan_out_once()
    assert (report.events, report.created) == (3, 6)
    created = {
        r[0] for r in world.sql("SELECT task_id::text FROM tasks WHERE dag_job IN ('a', 'b')")
    }
    # the pass wrote one wake-up row, naming each task it created once
    ((payload,),) = world.sql(
        "SELECT payload FROM outbox WHERE topic = 'wake' AND id > %s", [before]
    )
    assert sorted(payload["task_ids"]) == sorted(created)
    # the publisher sends one queue message per task: each a wake-up the worker reads
    queue = MemoryQueue("wakes")
    pool = await open_pool(world.db_url, min_size=1, max_size=2)
    try:
        publisher = OutboxPublisher(pool, queue=queue, policy=OutboxPolicy())
        while await publisher.publish_once():
            pass
    finally:
        await pool.close()
    messages = await queue.receive(max_messages=10, visibility_timeout=30)
    woken = [t for m in messages if (t := parse_wakeup(m.body)[0]) in created]
    assert sorted(woken) == sorted(created)
    assert world.sql("SELECT state FROM outbox WHERE topic = 'wake' AND id > %s", [before]) == [
        ("published",)
    ]


async def test_a_pass_that_races_a_consumer_deploy_rolls_back(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    await _run_source(world, ["r-0"])
    grants = dag_runs.read_grants
    deployed: list[object] = []

    async def deploy_then_grant(cur: Any, jobs: Any) -> Any:
        # a DAG reading the published dataset is deployed after fan_out_inputs answered
        # the pass's consumers and before the pass writes
        if not deployed:
            deployed.append(await world.dags.deploy(None, ORG, LATE))
        return await grants(cur, jobs)

    monkeypatch.setattr(dag_runs, "read_grants", deploy_then_grant)
    with pytest.raises(errors.Conflict):
        await world.runs.fan_out_once()
    # nothing consumed, nothing created
    assert world.sql("SELECT state FROM outbox WHERE topic = 'dag.event'") == [("pending",)]
    assert world.sql("SELECT count(*) FROM tasks WHERE dag_job IN ('a', 'b', 'd')") == [(0,)]
    report = await world.runs.fan_out_once()
    assert (report.events, report.created) == (1, 3)
    assert world.sql(
        "SELECT dag_job, read_datasets FROM tasks WHERE dag_job IN ('a', 'b', 'd') ORDER BY 1"
    ) == [("a", ["raw"]), ("b", ["raw"]), ("d", ["raw"])]
    assert world.sql("SELECT count(*) FROM task_inputs") == [(3,)]


async def test_a_pass_that_loses_a_key_to_a_concurrent_creator_rolls_back(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    producer = await _run_source(world, ["r-0"])
    ((dag_id,),) = world.sql("SELECT dag_id::text FROM dags WHERE name = 'flow'")
    key = f"event:{producer}:0:r-0:{dag_id}:a:0"
    other = psycopg.connect(world.db_url)  # a transaction that creates a's task first
    grants = dag_runs.read_grants
    committer: list[threading.Thread] = []

    def commit_once_the_pass_waits() -> None:
        # the pass's insert waits on the other transaction's uncommitted key, then finds it
        # taken when it commits
        with psycopg.connect(world.db_url, autocommit=True) as watch:
            for _ in range(3000):  # the pass's lock_timeout (5 s) ends a wait long before
                row = watch.execute(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE wait_event_type = 'Lock' AND datname = current_database()"
                ).fetchone()
                if row and row[0]:
                    break
                time.sleep(0.01)
        other.commit()

    async def race_then_grant(cur: Any, jobs: Any) -> Any:
        if not committer:
            other.execute(
                "INSERT INTO tasks (task_id, org_id, operator, payload, state, max_attempts, "
                "timeout_s, idempotency_key, runtime, dag_id, dag_version, dag_job) "
                "SELECT gen_random_uuid(), org_id, operator, '{}', 'queued', 1, 60, %s, "
                "runtime, dag_id, dag_version, 'a' FROM tasks WHERE task_id = %s",
                [key, producer],
            )
            committer.append(threading.Thread(target=commit_once_the_pass_waits))
            committer[0].start()
        return await grants(cur, jobs)

    monkeypatch.setattr(dag_runs, "read_grants", race_then_grant)
    try:
        with pytest.raises(errors.Conflict):
            await world.runs.fan_out_once()
    finally:
        committer[0].join()
        other.close()
    # nothing of the pass stayed: b's task, lineage, the announcement's consumption
    assert world.sql("SELECT state FROM outbox WHERE topic = 'dag.event'") == [("pending",)]
    assert world.sql("SELECT dag_job FROM tasks WHERE dag_job IN ('a', 'b')") == [("a",)]
    assert world.sql("SELECT count(*) FROM task_inputs") == [(0,)]
    # the next pass creates the rest: b's task; a's key is taken
    report = await world.runs.fan_out_once()
    assert (report.events, report.created) == (1, 1)
    assert world.sql("SELECT dag_job FROM tasks WHERE dag_job IN ('a', 'b') ORDER BY 1") == [
        ("a",),
        ("b",),
    ]


async def _emit_statements(w: World, sizes: list[int]) -> str:
    """Run ``src`` emitting one call (one statement) of events per size, then complete."""
    out = await w.runs.trigger(None, ORG, "flow", "src")
    c = await w.d.claim(out["task_id"])
    fence = {"task_id": c.task_id, "attempt": c.attempt, "lease_token": c.lease_token}
    n = 0
    for size in sizes:
        keys = [f"r-{n + i}" for i in range(size)]
        n += size
        await w.d.emit_events(
            wire.EventsRequest(**fence, events=[wire.EventIn(key=k, type="range") for k in keys])
        )
    await w.d.complete(wire.CompleteRequest(**fence))
    return str(out["task_id"])


async def test_one_announcement_names_the_events_of_one_statement(world: World) -> None:
    producer = await _emit_statements(world, [4, 1])
    # one outbox row per emitting statement, naming its events in order and, once, the output
    # (and sink dataset: none here) they were produced on
    rows = world.sql("SELECT payload FROM outbox WHERE topic = 'dag.event' ORDER BY id")
    assert [r[0] for r in rows] == [
        {"task_id": producer, "event_keys": ["r-0", "r-1", "r-2", "r-3"], "srcs": [[0, ""]]},
        {"task_id": producer, "event_keys": ["r-4"], "srcs": [[0, ""]]},
    ]
    report = await world.runs.fan_out_once()
    assert (report.events, report.created) == (5, 10)
    keys = world.sql(
        "SELECT dag_job, payload -> 'event' ->> 'key' FROM tasks "
        "WHERE dag_job IN ('a', 'b') ORDER BY 1, 2"
    )
    assert keys == [(job, f"r-{i}") for job in ("a", "b") for i in range(5)]
    assert world.sql("SELECT count(*) FROM task_inputs") == [(10,)]
    assert world.sql("SELECT state FROM outbox WHERE topic = 'dag.event'") == [
        ("published",),
        ("published",),
    ]


async def test_a_pass_takes_announcements_while_their_tasks_fit_its_batch(world: World) -> None:
    await _emit_statements(world, [2, 3, 4])  # each event makes 2 tasks (a and b)
    # 4 + 6 tasks fit a batch of 10; the third announcement (8 more) waits for the next pass
    first = await world.runs.fan_out_once(batch=10)
    assert (first.events, first.created) == (5, 10)
    assert world.sql(
        "SELECT jsonb_array_length(payload -> 'event_keys') FROM outbox "
        "WHERE topic = 'dag.event' AND state = 'pending'"
    ) == [(4,)]
    # an announcement larger than the batch is still taken whole (a pass takes at least one)
    second = await world.runs.fan_out_once(batch=2)
    assert (second.events, second.created) == (4, 8)
    assert (await world.runs.fan_out_once(batch=2)).events == 0
    assert world.sql(
        "SELECT count(DISTINCT payload -> 'event') FROM tasks WHERE dag_job = 'a'"
    ) == [(9,)]


async def test_a_pass_takes_announcements_while_their_events_fit_its_batch(world: World) -> None:
    spec: dict[str, Any] = {  # events nobody consumes: only the events count
        "name": "lonely",
        "jobs": {"src": {"operator": "noop", "triggers": [{"type": "manual"}], "outputs": [OUT]}},
    }
    await world.dags.deploy(None, ORG, spec)
    out = await world.runs.trigger(None, ORG, "lonely", "src")
    c = await world.d.claim(out["task_id"])
    fence = {"task_id": c.task_id, "attempt": c.attempt, "lease_token": c.lease_token}
    for lo in (0, 3):
        events = [wire.EventIn(key=f"e{lo + i}", type="range") for i in range(3)]
        await world.d.emit_events(wire.EventsRequest(**fence, events=events))
    first = await world.runs.fan_out_once(batch=3)
    assert (first.events, first.created) == (3, 0)
    second = await world.runs.fan_out_once(batch=3)
    assert (second.events, second.created) == (3, 0)
    assert (await world.runs.fan_out_once(batch=3)).events == 0


async def test_an_announcement_of_one_event_from_before_migration_0032_is_consumed(
    world: World,
) -> None:
    producer = await _run_source(world, ["r-0"])
    world.sql(  # the shape the per-event trigger wrote: {task_id, event_key}
        "UPDATE outbox SET payload = jsonb_build_object('task_id', payload ->> 'task_id', "
        "'event_key', payload -> 'event_keys' ->> 0) WHERE topic = 'dag.event'"
    )
    assert world.sql("SELECT payload FROM outbox WHERE topic = 'dag.event'") == [
        ({"task_id": producer, "event_key": "r-0"},)
    ]
    report = await world.runs.fan_out_once()
    assert (report.events, report.created) == (1, 2)
    assert world.sql("SELECT producer_task_id::text, event_key FROM task_inputs ORDER BY 1") == [
        (producer, "r-0"),
        (producer, "r-0"),
    ]


async def test_an_announcement_names_each_output_its_events_were_produced_on(
    world: World,
) -> None:
    spec: dict[str, Any] = {
        "name": "two",
        "jobs": {
            "src": {"operator": "noop", "triggers": [{"type": "manual"}], "outputs": [OUT, OUT]},
            "first": {"operator": "noop", "inputs": [{"from": {"job": "src"}}]},
            "second": {"operator": "noop", "inputs": [{"from": {"job": "src", "output": 1}}]},
        },
    }
    await world.dags.deploy(None, ORG, spec)
    out = await world.runs.trigger(None, ORG, "two", "src")
    c = await world.d.claim(out["task_id"])
    fence = {"task_id": c.task_id, "attempt": c.attempt, "lease_token": c.lease_token}
    events = [
        wire.EventIn(key="e0", type="range"),
        wire.EventIn(key="e1", type="range", payload={"output": 1}),
        wire.EventIn(key="e2", type="range", payload={"output": 1}),
    ]
    await world.d.complete(wire.CompleteRequest(**fence, final_events=events))
    ((srcs,),) = world.sql("SELECT payload -> 'srcs' FROM outbox WHERE topic = 'dag.event'")
    assert sorted(srcs) == [[0, ""], [1, ""]]
    report = await world.runs.fan_out_once()
    assert (report.events, report.created) == (3, 3)
    assert world.sql(
        "SELECT dag_job, payload -> 'event' ->> 'key' FROM tasks "
        "WHERE dag_job IN ('first', 'second') ORDER BY 1, 2"
    ) == [("first", "e0"), ("second", "e1"), ("second", "e2")]


async def test_fan_out_until_idle_drains_a_backlog_pass_after_pass(world: World) -> None:
    await _emit_statements(world, [2, 2, 2])
    report = await world.runs.fan_out_until_idle(batch=4)  # three passes of one announcement
    assert (report.events, report.created, report.held) == (6, 12, 0)
    assert world.sql(
        "SELECT count(*) FROM outbox WHERE topic = 'dag.event' AND state = 'pending'"
    ) == [(0,)]
    assert (await world.runs.fan_out_until_idle(batch=2)).events == 0


async def test_the_fan_out_loop_wakes_on_the_announcements_notify(world: World) -> None:
    """With a poll far longer than the test waits, events still fan out at once: the
    announcing trigger's NOTIFY trace_dag_events wakes the loop's wait."""

    def listening() -> bool:
        return world.sql(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND query = %s",
            (f'LISTEN "{dag_runs.EVENTS_CHANNEL}"',),
        ) == [(1,)]

    stop = asyncio.Event()
    loop = asyncio.create_task(world.runs.run(stop, fan_out_every_s=600, schedule_every_s=600))
    try:
        await wait_until(listening, "the fan-out loop listening")  # before anything is announced
        await asyncio.sleep(0.2)  # the loop's first pass found nothing and waits
        await _run_source(world, ["r-0", "r-1"])
        await wait_until(  # at most 10 s, far below the 600 s poll
            lambda: world.sql("SELECT count(*) FROM tasks WHERE dag_job IN ('a', 'b')") == [(4,)],
            "the fan-out loop woken by the announcement's NOTIFY",
        )
    finally:
        stop.set()
        await asyncio.wait_for(loop, 30)
