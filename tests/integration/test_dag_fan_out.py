"""The set-based DAG fan-out on real Postgres: one wake-up row per pass still wakes every task
it created (one queue message each), and a pass that races the deploy of a consuming DAG rolls
back whole (nothing consumed, nothing created) and the next pass creates every consumer's task."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import attrs
import psycopg
import pytest

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
        with psycopg.connect(self.db_url, autocommit=True) as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description else []


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
