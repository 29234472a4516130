"""Permissions from the DAG, on real Postgres: a DAG task's token reads exactly its job's
declared inputs that the DAG's deployer may read (``read_roles`` gates DAG-to-DAG reads too),
and a DAG task commits only to datasets its own DAG produces."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from typing import Any

import attrs
import pytest

from pg_sql import sql
from trace_core import errors, wire
from trace_core.testing import MemoryObjectStore, MemoryQueue, MemorySigner
from trace_lite.dag_runs import DagRuns
from trace_lite.dags import Dags
from trace_lite.datasets import Datasets
from trace_lite.dispatcher import Dispatcher, open_pool
from trace_servers.dag_cli import builtin_operators

ORG = "acme"
OUT = {"storage": "object_store", "update_strategy": "append"}

# alice deploys FLOW: src publishes raw; b reads src's output (raw) and an unpublished output
FLOW: dict[str, Any] = {
    "name": "flow",
    "jobs": {
        "src": {
            "operator": "emit_events",
            "triggers": [{"type": "manual"}],
            "outputs": [OUT, OUT],
        },
        "b": {
            "operator": "noop",
            "inputs": [{"from": {"job": "src"}}, {"from": {"job": "src", "output": 1}}],
        },
    },
    "publish": [{"job": "src", "output": 0, "dataset": "raw"}],
}
# carol deploys DOWN: d reads the dataset raw of FLOW and publishes derived
DOWN: dict[str, Any] = {
    "name": "down",
    "jobs": {"d": {"operator": "noop", "inputs": [{"from": {"dataset": "raw"}}], "outputs": [OUT]}},
    "publish": [{"job": "d", "output": 0, "dataset": "derived"}],
}


@attrs.define
class World:
    d: Dispatcher
    dags: Dags
    runs: DagRuns
    ds: Datasets
    store: MemoryObjectStore
    db_url: str

    def sql(self, query: str, params: Any = None) -> list[tuple[Any, ...]]:
        return sql(self.db_url, query, params)

    def grants(self, job: str) -> list[list[str]]:
        rows = self.sql(
            "SELECT read_datasets FROM tasks WHERE dag_job = %s ORDER BY created_at, task_id",
            [job],
        )
        return [list(r[0]) for r in rows]


@pytest.fixture
async def world(db_url: str) -> AsyncIterator[World]:
    pool = await open_pool(db_url, min_size=2, max_size=12)
    store = MemoryObjectStore()
    d = Dispatcher(pool, signer=MemorySigner(), queue=MemoryQueue("t"), object_store=store)
    ds = Datasets(pool, object_store=store)
    await ds.set_member(None, ORG, "alice", ["dag_deployer"])
    await ds.set_member(None, ORG, "carol", ["dag_deployer"])
    dags = Dags(pool, operators=builtin_operators())
    await dags.deploy(await dags.user_caller(ORG, "alice"), ORG, FLOW)
    await dags.deploy(await dags.user_caller(ORG, "carol"), ORG, DOWN)
    try:
        yield World(d, dags, DagRuns(pool), ds, store, db_url)
    finally:
        await pool.close()


async def _claim(w: World, task_id: str) -> dict[str, Any]:
    c = await w.d.claim(task_id)
    return {"task_id": c.task_id, "attempt": c.attempt, "lease_token": c.lease_token}


async def _run_source(w: World) -> dict[str, Any]:
    """Trigger and claim ``src``; it emits one event on output 0 (fanned out to b and d)."""
    out = await w.runs.trigger(None, ORG, "flow", "src")
    fence = await _claim(w, out["task_id"])
    await w.d.emit_events(wire.EventsRequest(**fence, events=[wire.EventIn(key="e1", type="x")]))
    await w.runs.fan_out_once()
    return fence


async def _token_reads(w: World, job: str, name: str) -> bool:
    """Whether the capability token of a claimed task of ``job`` resolves dataset ``name``."""
    (task_id,) = w.sql(
        "SELECT task_id::text FROM tasks WHERE dag_job = %s AND state = 'queued' "
        "ORDER BY created_at DESC LIMIT 1",
        [job],
    )[0]
    c = await w.d.claim(task_id)
    claims = await w.d.authorize(c.capability_token, c.task_id, c.attempt)
    try:
        await w.ds.resolve_for_task(claims, [name], pin_ttl_s=0)
    except errors.Forbidden:
        return False
    return True


async def _output(w: World, fence: dict[str, Any], dataset: str) -> dict[str, Any]:
    payload = await w.d.fetch(fence["task_id"], fence["attempt"])
    key = f"{payload.staging_prefix}part-0.json"
    data = b'{"n": 1}'
    await w.store.put(key, data)
    return {
        "dataset": dataset,
        "object_key": key,
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "partition": {"start": 0, "end": 10},
    }


async def test_grants_are_declared_inputs_the_deployer_may_read(world: World) -> None:
    await _run_source(world)
    # b (deployed by alice, a deployer of flow): the published upstream output, nothing for the
    # unpublished one; d (carol: no read role on raw, not a deployer of flow): nothing
    assert world.grants("b") == [["raw"]]
    assert world.grants("d") == [[]]
    assert world.grants("src") == [[]]
    assert await _token_reads(world, "b", "raw")
    assert not await _token_reads(world, "d", "raw")
    # nor a dataset b did not declare, even one alice may read
    await _run_source(world)
    assert not await _token_reads(world, "b", "derived")


async def test_read_roles_gate_dag_to_dag_reads(world: World) -> None:
    await world.ds.set_read_roles(None, ORG, "raw", ["analyst"])
    await _run_source(world)
    assert world.grants("d") == [[]]  # carol does not hold analyst
    await world.ds.set_member(None, ORG, "carol", ["dag_deployer", "analyst"])
    await _run_source(world)
    assert world.grants("d") == [[], ["raw"]]  # tasks created after the grant read it
    assert await _token_reads(world, "d", "raw")
    # an admin deployer reads whatever its job declares
    await world.ds.set_member(None, ORG, "carol", ["admin"])
    await world.ds.set_read_roles(None, ORG, "raw", [])
    await _run_source(world)
    assert world.grants("d")[-1] == ["raw"]


async def test_a_dag_task_commits_only_to_its_dags_datasets(world: World) -> None:
    fence = await _run_source(world)
    # src (flow) naming down's dataset: refused, nothing committed, the attempt still running
    with pytest.raises(errors.Forbidden) as info:
        await world.d.complete(
            wire.CompleteRequest(
                **fence,
                outputs=[
                    wire.structure(await _output(world, fence, "raw"), wire.OutputIn),
                    wire.structure(await _output(world, fence, "derived"), wire.OutputIn),
                ],
            )
        )
    assert info.value.field == "outputs[1].dataset"
    assert world.sql("SELECT count(*) FROM dataset_partitions") == [(0,)]
    assert world.sql(
        "SELECT outcome FROM task_attempts WHERE task_id = %s", [fence["task_id"]]
    ) == [("running",)]
    # d (down) naming flow's dataset: refused too
    (d_task,) = world.sql("SELECT task_id::text FROM tasks WHERE dag_job = 'd'")[0]
    d_fence = await _claim(world, d_task)
    with pytest.raises(errors.Forbidden):
        await world.d.complete(
            wire.CompleteRequest(
                **d_fence,
                outputs=[wire.structure(await _output(world, d_fence, "raw"), wire.OutputIn)],
            )
        )
    assert world.sql("SELECT count(*) FROM dataset_partitions") == [(0,)]
    # each commits to its own DAG's dataset
    for f, name in ((fence, "raw"), (d_fence, "derived")):
        out = wire.structure(await _output(world, f, name), wire.OutputIn)
        done = await world.d.complete(wire.CompleteRequest(**f, outputs=[out]))
        assert done.state == "completed"
    assert world.sql("SELECT count(*) FROM dataset_partitions") == [(2,)]


async def test_admin_api_tasks_keep_committing_anywhere_in_their_org(world: World) -> None:
    (info,) = await world.d.create_tasks([wire.CreateTaskRequest(operator="stage", org=ORG)])
    fence = await _claim(world, info.task_id)
    out = wire.structure(await _output(world, fence, "derived"), wire.OutputIn)
    done = await world.d.complete(wire.CompleteRequest(**fence, outputs=[out]))
    assert done.state == "completed"


async def test_over_http_a_foreign_commit_and_an_ungranted_read_are_403(world: World) -> None:
    from aiohttp.test_utils import TestClient, TestServer

    from trace_servers.app import make_app

    platform = "platform-token-for-tests-0123456789"
    auth = {"Authorization": f"Bearer {platform}"}
    await _run_source(world)  # leaves src running and creates b and d
    (d_task,) = world.sql("SELECT task_id::text FROM tasks WHERE dag_job = 'd'")[0]
    async with TestClient(TestServer(make_app(world.d, platform_token=platform))) as client:
        r = await client.post("/internal/task-claim", json={"task_id": d_task}, headers=auth)
        claim = await r.json()
        cap = {"X-Trace-Task-Capability": claim["capability_token"]}
        fence = {k: claim[k] for k in ("task_id", "attempt", "lease_token")}
        r = await client.post("/v1/task/resolve", json={**fence, "datasets": ["raw"]}, headers=cap)
        refused = await r.json()
        assert r.status == 403 and refused["error"] == "forbidden" and "raw" in refused["message"]
        out = await _output(world, fence, "raw")
        r = await client.post("/v1/task/complete", json={**fence, "outputs": [out]}, headers=cap)
        body = await r.json()
        assert r.status == 403
        assert (body["error"], body["field"]) == ("forbidden", "outputs[0].dataset")
    assert world.sql("SELECT count(*) FROM dataset_partitions") == [(0,)]
    assert world.sql("SELECT state FROM tasks WHERE task_id = %s", [d_task]) == [("running",)]
