"""Controlling deployed DAGs on real Postgres: a rollback restores the previous version and its
pointer set in one transaction and cancels the rolled-back version's queued and running work
(a running attempt learns it at its next heartbeat); concurrent readers see the whole old or the
whole restored pointer set, never a mix; a fan-out that planned against the rolled-back version
creates nothing of it; a DAG run and a whole version are canceled; status counts tasks."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from aiohttp.test_utils import TestClient, TestServer

from pg_sql import sql
from trace_core import errors, wire
from trace_core.testing import MemoryObjectStore, MemoryQueue, MemorySigner
from trace_lite.dag_control import DagControl
from trace_lite.dag_runs import DagRuns, NewTask, create_dag_tasks
from trace_lite.dags import Dags
from trace_lite.datasets import Datasets
from trace_lite.dispatcher import Dispatcher, open_pool
from trace_lite.pg import transaction
from trace_lite.users import LocalUserIssuer, UserAuthenticator
from trace_servers.app import make_app
from trace_servers.dag_cli import builtin_operators

ORG = "acme"
PLATFORM = "platform-token-for-tests-0123456789"
OUT = {"storage": "object_store", "update_strategy": "append"}

FLOW: dict[str, Any] = {
    "name": "flow",
    "jobs": {
        "src": {"operator": "emit_events", "triggers": [{"type": "manual"}], "outputs": [OUT]},
        "b": {"operator": "noop", "inputs": [{"from": {"job": "src"}}], "outputs": [OUT]},
        "c": {"operator": "noop", "inputs": [{"from": {"job": "b"}}]},
    },
    "publish": [
        {"job": "src", "output": 0, "dataset": "raw"},
        {"job": "b", "output": 0, "dataset": "mid"},
    ],
}


def edited() -> dict[str, Any]:
    """FLOW with an execution-only edit of ``b`` (its timeout): a new version, live at once
    (a materialization-affecting edit is staged first: ``test_dag_remat.py``)."""
    doc = copy.deepcopy(FLOW)
    doc["jobs"]["b"]["timeout"] = 30
    return doc


@attrs.define
class World:
    d: Dispatcher
    dags: Dags
    runs: DagRuns
    control: DagControl
    ds: Datasets
    db_url: str

    def sql(self, query: str, params: Any = None) -> list[tuple[Any, ...]]:
        return sql(self.db_url, query, params)

    async def pointers(self) -> tuple[str | None, ...]:
        admin = await self.ds.user_caller(ORG, "ada")
        out = await self.ds.resolve(admin, ORG, ["raw", "mid"], pin_ttl_s=0)
        return tuple(r.dataset_version for r in out.datasets)

    async def cutover_both(self) -> tuple[str, str]:
        raw = await self.ds.open_version(None, ORG, "raw")
        mid = await self.ds.open_version(None, ORG, "mid")
        await self.ds.cutover(None, ORG, "flow", {"raw": raw, "mid": mid})
        return raw, mid


@pytest.fixture
async def world(db_url: str) -> AsyncIterator[World]:
    pool = await open_pool(db_url, min_size=2, max_size=12)
    d = Dispatcher(
        pool, signer=MemorySigner(), queue=MemoryQueue("t"), object_store=MemoryObjectStore()
    )
    ds = Datasets(pool, object_store=MemoryObjectStore())
    await ds.set_member(None, ORG, "ada", ["admin"])
    await ds.set_member(None, ORG, "dora", ["dag_deployer"])
    await ds.set_member(None, ORG, "bob", [])
    dags = Dags(pool, operators=builtin_operators())
    assert (await dags.deploy(None, ORG, FLOW)).version == 1
    try:
        yield World(d, dags, DagRuns(pool), DagControl(pool), ds, db_url)
    finally:
        await pool.close()


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _fence(c: wire.ClaimResponse) -> dict[str, Any]:
    return {"task_id": c.task_id, "attempt": c.attempt, "lease_token": c.lease_token}


async def test_rollback_restores_version_and_pointer_set_and_cancels_work(world: World) -> None:
    old = await world.pointers()
    assert None not in old
    assert (await world.dags.deploy(None, ORG, edited())).version == 2
    new = await world.cutover_both()  # the pointer set v2 serves
    assert await world.pointers() == new
    queued = await world.runs.trigger(None, ORG, "flow", "src", run_id="r1")
    running = await world.runs.trigger(None, ORG, "flow", "src", run_id="r2")
    claim = await world.d.claim(running["task_id"])
    done = await world.runs.trigger(None, ORG, "flow", "src", run_id="r3")
    finished = await world.d.claim(done["task_id"])
    await world.d.complete(wire.CompleteRequest(**_fence(finished)))

    bob = await world.control.orgs.user_caller(ORG, "bob")
    with pytest.raises(errors.Forbidden):
        await world.control.rollback(bob, ORG, "flow")
    assert world.sql("SELECT active_version FROM dags") == [(2,)]  # nothing written

    dora = await world.control.orgs.user_caller(ORG, "dora")
    out = await world.control.rollback(dora, ORG, "flow")
    assert (out.from_version, out.version) == (2, 1)
    assert out.canceled == {"queued": 1, "running": 1}
    assert await world.pointers() == old
    states = dict(world.sql("SELECT task_id::text, state FROM tasks"))
    assert states == {
        queued["task_id"]: "canceled",
        running["task_id"]: "canceled",
        done["task_id"]: "completed",
    }
    # The running attempt learns it at its next heartbeat, and cannot complete.
    with pytest.raises(errors.TaskCanceled):
        await world.d.heartbeat(wire.HeartbeatRequest(**_fence(claim)))
    with pytest.raises(errors.TaskCanceled):
        await world.d.complete(wire.CompleteRequest(**_fence(claim)))
    # Triggers run the restored version.
    again = await world.runs.trigger(None, ORG, "flow", "src", run_id="r4")
    assert again["version"] == 1
    # Nothing before version 1's deploy: a second rollback is refused and changes nothing.
    with pytest.raises(errors.Conflict):
        await world.control.rollback(None, ORG, "flow")
    assert world.sql("SELECT active_version FROM dags") == [(1,)]
    # Deploying again and rolling back steps back to version 1 and its pointer set again.
    assert (await world.dags.deploy(None, ORG, edited())).version == 3
    await world.cutover_both()
    out = await world.control.rollback(None, ORG, "flow")
    assert (out.from_version, out.version, out.canceled) == (3, 1, {})
    assert await world.pointers() == old
    kinds = world.sql("SELECT version, reason FROM dag_activations ORDER BY seq")
    assert kinds == [(1, "deploy"), (2, "deploy"), (1, "rollback"), (3, "deploy"), (1, "rollback")]


async def test_rollback_refuses_a_purged_previous_pointer_set(world: World) -> None:
    (raw_v1, _) = await world.pointers()
    await world.dags.deploy(None, ORG, edited())
    await world.cutover_both()
    admin = await world.ds.user_caller(ORG, "ada")
    await world.ds.purge(admin, ORG, "raw", str(raw_v1))
    with pytest.raises(errors.Conflict):
        await world.control.rollback(None, ORG, "flow")
    assert world.sql("SELECT active_version FROM dags") == [(2,)]


async def test_concurrent_readers_see_the_old_or_the_restored_set_never_a_mix(
    world: World,
) -> None:
    old = await world.pointers()
    await world.dags.deploy(None, ORG, edited())
    new = await world.cutover_both()
    for i in range(5):
        await world.runs.trigger(None, ORG, "flow", "src", run_id=f"q{i}")
    stop = asyncio.Event()
    seen: list[tuple[str | None, ...]] = []
    snapshots: list[tuple[Any, ...]] = []

    enough = asyncio.Event()  # set once `want` pointer reads are seen
    want = [8]

    async def read_pointers() -> None:
        while not stop.is_set():
            seen.append(await world.pointers())
            if len(seen) >= want[0]:
                enough.set()

    def snapshot() -> tuple[Any, ...]:
        # One statement: the active version with the v2 tasks still queued.
        (row,) = world.sql(
            "SELECT g.active_version, (SELECT count(*) FROM tasks t WHERE t.dag_id = g.dag_id "
            "AND t.dag_version = 2 AND t.state = 'queued') FROM dags g WHERE g.name = 'flow'"
        )
        return row

    async def read_tasks() -> None:
        while not stop.is_set():
            snapshots.append(await asyncio.to_thread(snapshot))

    readers = [asyncio.create_task(read_pointers()) for _ in range(4)]
    readers.append(asyncio.create_task(read_tasks()))
    await enough.wait()
    snapshots.append(await asyncio.to_thread(snapshot))  # before the rollback: old
    await world.control.rollback(None, ORG, "flow")
    enough.clear()
    want[0] = len(seen) + 8
    await enough.wait()
    stop.set()
    await asyncio.gather(*readers)
    snapshots.append(snapshot())
    assert set(seen) <= {new, old} and new in seen and old in seen
    assert set(snapshots) == {(2, 5), (1, 0)}


async def test_a_fan_out_planned_against_the_rolled_back_version_creates_nothing_of_it(
    world: World,
) -> None:
    """Task creation locks the DAG row FOR SHARE and refuses a version no longer active: an
    event announced under v2 and fanned out after the rollback runs v1's consumers."""
    await world.dags.deploy(None, ORG, edited())
    src = await world.runs.trigger(None, ORG, "flow", "src", run_id="e1")
    c = await world.d.claim(src["task_id"])
    # The source completes before the rollback: its event waits for the fan-out.
    await world.d.complete(
        wire.CompleteRequest(**_fence(c), final_events=[wire.EventIn(key="k1", type="range")])
    )
    await world.control.rollback(None, ORG, "flow")
    # A creator that read version 2 before the rollback committed creates nothing of it.
    stale = NewTask(
        org_id="",
        dag_id=world.sql("SELECT dag_id::text FROM dags")[0][0],
        version=2,
        job="b",
        operator="noop",
        runtime="worker",
        timeout_s=60,
        max_attempts=1,
        payload={},
        idempotency_key="stale",
    )
    (org_id,) = world.sql("SELECT org_id::text FROM dags")[0]
    stale = attrs.evolve(stale, org_id=org_id)
    with pytest.raises(errors.Conflict):
        async with transaction(world.d.pool) as cur:
            await create_dag_tasks(cur, [stale], "queue")
    assert world.sql("SELECT count(*) FROM tasks WHERE idempotency_key = 'stale'") == [(0,)]
    # The event announced under version 2 runs version 1's consumers after the rollback.
    report = await world.runs.fan_out_once()
    assert (report.events, report.created) == (1, 1)
    assert world.sql("SELECT dag_job, dag_version, state FROM tasks WHERE dag_job = 'b'") == [
        ("b", 1, "queued")
    ]


async def test_cancel_a_run_and_a_version(world: World) -> None:
    r1 = await world.runs.trigger(None, ORG, "flow", "src", run_id="r1")
    r2 = await world.runs.trigger(None, ORG, "flow", "src", run_id="r2")
    c = await world.d.claim(r1["task_id"])
    await world.d.complete(
        wire.CompleteRequest(
            **_fence(c), final_events=[wire.EventIn(key=f"k{i}", type="range") for i in range(3)]
        )
    )
    assert (await world.runs.fan_out_once()).created == 3  # three b tasks of run r1
    (b_task,) = world.sql("SELECT task_id::text FROM tasks WHERE dag_job = 'b' LIMIT 1")
    bc = await world.d.claim(b_task[0])
    await world.d.complete(
        wire.CompleteRequest(**_fence(bc), final_events=[wire.EventIn(key="x", type="range")])
    )
    assert (await world.runs.fan_out_once()).created == 1  # one c task, grandchild of r1

    bob = await world.control.orgs.user_caller(ORG, "bob")
    with pytest.raises(errors.Forbidden):
        await world.control.cancel_run(bob, ORG, "flow", "r1")
    with pytest.raises(errors.NotFound):
        await world.control.cancel_run(None, ORG, "flow", "nope")
    out = await world.control.cancel_run(None, ORG, "flow", "r1")
    assert out == {"dag": "flow", "run_id": "r1", "tasks": 5, "canceled": {"queued": 3}}
    by_job = world.sql("SELECT dag_job, state, count(*) FROM tasks GROUP BY 1, 2 ORDER BY 1, 2")
    assert by_job == [
        ("b", "canceled", 2),
        ("b", "completed", 1),
        ("c", "canceled", 1),
        ("src", "completed", 1),
        ("src", "queued", 1),  # run r2 untouched
    ]
    again = await world.control.cancel_run(None, ORG, "flow", "r1")
    assert again["canceled"] == {}

    status = await world.control.status(bob, ORG, "flow")
    assert status["active_version"] == 1
    assert status["jobs"]["src"]["queued"] == 1 and status["jobs"]["src"]["completed"] == 1
    assert status["jobs"]["c"]["canceled"] == 1 and status["jobs"]["c"]["running"] == 0

    with pytest.raises(errors.NotFound):
        await world.control.cancel_version(None, ORG, "flow", 7)
    with pytest.raises(errors.Forbidden):
        await world.control.cancel_version(bob, ORG, "flow", 1)
    out = await world.control.cancel_version(None, ORG, "flow", 1)
    assert out == {"dag": "flow", "version": 1, "canceled": {"queued": 1}}
    assert world.sql("SELECT state FROM tasks WHERE task_id = %s", [r2["task_id"]]) == [
        ("canceled",)
    ]
    # A deploy keeps the old version's unfinished work visible in the status.
    await world.dags.deploy(None, ORG, edited())
    await world.runs.trigger(None, ORG, "flow", "src", run_id="v2")
    status = await world.control.status(None, ORG, "flow")
    assert status["active_version"] == 2 and status["jobs"]["src"]["queued"] == 1
    assert status["other_versions"] == {}


async def test_control_routes_over_http(world: World, tmp_path: Path) -> None:
    issuer = LocalUserIssuer.init(tmp_path / "keys")
    auth = UserAuthenticator({issuer.key.kid: issuer.key})
    dora, bob = _bearer(issuer.token("dora")), _bearer(issuer.token("bob"))
    eve = _bearer(issuer.token("eve"))
    base = f"/v1/orgs/{ORG}/dags/flow"
    await world.dags.deploy(None, ORG, edited())
    run = await world.runs.trigger(None, ORG, "flow", "src", run_id="r1")
    app = make_app(world.d, platform_token=PLATFORM, user_auth=auth)
    async with TestClient(TestServer(app)) as c:
        r = await c.get(f"{base}/status")
        assert r.status == 401
        r = await c.get(f"{base}/status", headers=eve)
        assert r.status == 404 and (await r.json())["field"] == "org"
        r = await c.get(f"{base}/status", headers=bob)
        body = await r.json()
        assert r.status == 200 and body["active_version"] == 2
        assert body["jobs"]["src"]["queued"] == 1 and body["jobs"]["b"]["queued"] == 0
        r = await c.post(f"{base}/runs/r1/cancel", headers=bob)
        assert r.status == 403
        r = await c.post(f"{base}/runs/-bad/cancel", headers=dora)
        body = await r.json()
        assert (r.status, body["error"], body["field"]) == (422, "validation_failed", "run_id")
        r = await c.post(f"{base}/runs/nope/cancel", headers=dora)
        assert r.status == 404 and (await r.json())["field"] == "run_id"
        # a schedule slot's run id (an ISO time with its offset) is a run id
        r = await c.post(f"{base}/runs/2026-11-30T23%3A45%3A00%2B00%3A00/cancel", headers=dora)
        assert r.status == 404 and (await r.json())["field"] == "run_id"
        r = await c.post(f"{base}/versions/x/cancel", headers=dora)
        assert r.status == 422 and (await r.json())["field"] == "version"
        r = await c.post(f"{base}/versions/0/cancel", headers=dora)
        assert r.status == 422 and (await r.json())["field"] == "version"
        r = await c.post(f"{base}/versions/9/cancel", headers=dora)
        assert r.status == 404 and (await r.json())["field"] == "version"
        assert world.sql("SELECT state FROM tasks") == [("queued",)]  # nothing written
        r = await c.post(f"{base}/versions/rollback", headers=bob)
        assert r.status == 403
        assert world.sql("SELECT active_version FROM dags") == [(2,)]
        r = await c.post(f"{base}/versions/rollback", headers=dora)
        body = await r.json()
        assert r.status == 200, body
        assert body == {
            "dag": "flow",
            "from_version": 2,
            "version": 1,
            "generation": body["generation"],
            "canceled": {"queued": 1},
            "abandoned": False,
        }
        r = await c.post(f"{base}/versions/rollback", headers=dora)
        body = await r.json()
        assert (r.status, body["error"]) == (409, "conflict")
        r = await c.post(f"{base}/runs/r1/cancel", headers=dora)
        assert r.status == 200 and (await r.json())["canceled"] == {}
        r = await c.post(f"{base}/versions/1/cancel", headers=dora)
        assert r.status == 200 and (await r.json())["canceled"] == {}
        r = await c.post(f"/v1/orgs/{ORG}/dags/nope/versions/rollback", headers=dora)
        assert r.status == 404 and (await r.json())["field"] == "dag"
    assert world.sql("SELECT task_id::text, state FROM tasks") == [(run["task_id"], "canceled")]
