"""Invalidation cascades on real Postgres (``trace_lite.dag_invalidations``): a replaced range of
a dataset reruns exactly the DAG tasks whose input read it (lineage), transitively through the
reruns' events; once per replacement; nothing when the replacing task announced the range
itself (its fan-out reruns the consumers)."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import pytest
from aiohttp.test_utils import TestClient, TestServer

from pg_sql import sql
from trace_core import errors, wire
from trace_core.testing import MemoryObjectStore, MemoryQueue, MemorySigner
from trace_lite.dag_invalidations import Invalidations
from trace_lite.dag_runs import DagRuns
from trace_lite.dags import Dags
from trace_lite.datasets import Datasets
from trace_lite.dispatcher import Dispatcher, open_pool
from trace_lite.users import LocalUserIssuer, UserAuthenticator
from trace_servers.app import make_app
from trace_servers.dag_cli import builtin_operators

ORG = "acme"
REPLACE = {"storage": "object_store", "update_strategy": "replace"}
APPEND = {"storage": "object_store", "update_strategy": "append"}

# src commits block ranges of raw and announces them; b reads them, c reads b's events
FLOW: dict[str, Any] = {
    "name": "flow",
    "jobs": {
        "src": {"operator": "noop", "triggers": [{"type": "manual"}], "outputs": [REPLACE]},
        "b": {"operator": "noop", "inputs": [{"from": {"job": "src"}}], "outputs": [APPEND]},
        "c": {"operator": "noop", "inputs": [{"from": {"job": "b"}}]},
    },
    "publish": [{"job": "src", "output": 0, "dataset": "raw"}],
}


@attrs.define
class World:
    d: Dispatcher
    dags: Dags
    runs: DagRuns
    inv: Invalidations
    ds: Datasets
    store: MemoryObjectStore
    db_url: str

    def sql(self, query: str, params: Any = None) -> list[tuple[Any, ...]]:
        return sql(self.db_url, query, params)

    def tasks_of(self, job: str) -> list[tuple[str, dict[str, Any]]]:
        rows = self.sql(
            "SELECT task_id::text, payload FROM tasks WHERE dag_job = %s ORDER BY created_at, "
            "(payload #>> '{event,payload,start}')::int NULLS FIRST, task_id",
            [job],
        )
        return [(r[0], r[1]) for r in rows]


@pytest.fixture
async def world(db_url: str) -> AsyncIterator[World]:
    pool = await open_pool(db_url, min_size=2, max_size=12)
    store = MemoryObjectStore()
    d = Dispatcher(pool, signer=MemorySigner(), queue=MemoryQueue("t"), object_store=store)
    ds = Datasets(pool, object_store=store)
    await ds.set_member(None, ORG, "alice", ["dag_deployer"])
    await ds.set_member(None, ORG, "bob", [])
    dags = Dags(pool, operators=builtin_operators())
    await dags.deploy(None, ORG, FLOW)
    try:
        yield World(d, dags, DagRuns(pool), Invalidations(pool), ds, store, db_url)
    finally:
        await pool.close()


async def _run(
    w: World,
    task_id: str,
    *,
    commits: Sequence[tuple[int, int]] = (),
    announces: Sequence[tuple[int, int]] = (),
) -> None:
    """Claim ``task_id``, commit a partition of raw per range of ``commits`` and announce each
    range of ``announces`` as an event; then fan the events out."""
    c = await w.d.claim(task_id)
    fence = {"task_id": c.task_id, "attempt": c.attempt, "lease_token": c.lease_token}
    payload = await w.d.fetch(c.task_id, c.attempt)
    outputs = []
    for start, end in commits:
        key = f"{payload.staging_prefix}{start}_{end}.json"
        data = f'{{"start": {start}, "task": "{task_id}"}}'.encode()
        await w.store.put(key, data)
        outputs.append(
            wire.OutputIn(
                dataset="raw",
                object_key=key,
                size=len(data),
                sha256=hashlib.sha256(data).hexdigest(),
                partition=wire.PartitionIn(start=start, end=end),
            )
        )
    events = [
        wire.EventIn(key=f"range:{s}_{e}", type="range", payload={"start": s, "end": e})
        for s, e in announces
    ]
    await w.d.complete(wire.CompleteRequest(**fence, outputs=outputs, final_events=events))
    await w.runs.fan_out_once()


async def _source(w: World, **kw: Any) -> str:
    out = await w.runs.trigger(None, ORG, "flow", "src")
    await _run(w, out["task_id"], **kw)
    return str(out["task_id"])


async def test_a_replaced_range_reruns_exactly_its_readers(world: World) -> None:
    await _source(world, commits=[(0, 10), (10, 20)], announces=[(0, 10), (10, 20)])
    (b0, p0), (_, p1) = world.tasks_of("b")
    assert (p0["event"]["payload"], p1["event"]["payload"]) == (
        {"start": 0, "end": 10},
        {"start": 10, "end": 20},
    )
    # another run rewrites [0, 10) of raw without announcing it: b0 read stale rows
    await _source(world, commits=[(0, 10)])
    report = await world.inv.invalidate(None, ORG, "raw", start=0, end=10)
    assert not report.announced_by_producer
    assert [(r.job, r.rerun_of) for r in report.reruns] == [("b", b0)]
    ((rerun_id, payload),) = world.tasks_of("b")[2:]
    assert payload["event"] == p0["event"] and payload["rerun_of"] == b0
    # the rerun has lineage of its own: the dataset version it reads
    assert world.sql(
        "SELECT count(*) FROM task_inputs WHERE task_id = %s AND dataset_uuid IS NOT NULL",
        [rerun_id],
    ) == [(1,)]
    # once per replacement: invalidating again creates nothing
    again = await world.inv.invalidate(None, ORG, "raw", start=0, end=10)
    assert (again.reruns, again.dependents) == ((), 1)
    # transitive: the rerun's events reach c through the fan-out, once
    c_before = len(world.tasks_of("c"))
    await _run_b(world, rerun_id)
    assert len(world.tasks_of("c")) == c_before + 1


async def _run_b(w: World, task_id: str) -> None:
    c = await w.d.claim(task_id)
    fence = {"task_id": c.task_id, "attempt": c.attempt, "lease_token": c.lease_token}
    done = [wire.EventIn(key="done", type="done")]
    await w.d.complete(wire.CompleteRequest(**fence, final_events=done))
    await w.runs.fan_out_once()


async def test_a_range_the_replacing_task_announced_is_left_to_the_fan_out(world: World) -> None:
    await _source(world, commits=[(0, 10)], announces=[(0, 10)])
    await _source(world, commits=[(0, 10)], announces=[(0, 10)])
    # the second run's event already created b's rerun through the fan-out
    assert len(world.tasks_of("b")) == 2
    report = await world.inv.invalidate(None, ORG, "raw", start=0, end=10)
    assert report.announced_by_producer and report.reruns == ()
    assert len(world.tasks_of("b")) == 2


async def test_replace_commits_are_consumed_by_the_pass(world: World) -> None:
    await _source(world, commits=[(0, 10), (10, 20)], announces=[(0, 10), (10, 20)])
    await _source(world, commits=[(10, 20)])  # emits a dataset.invalidate outbox row
    assert world.sql(
        "SELECT count(*) FROM outbox WHERE topic = 'dataset.invalidate' AND state = 'pending'"
    ) == [(1,)]
    assert await world.inv.consume_once() == 1
    (_, p1) = world.tasks_of("b")[1]
    ((_, rerun),) = world.tasks_of("b")[2:]
    assert rerun["event"] == p1["event"]
    assert world.sql("SELECT state FROM outbox WHERE topic = 'dataset.invalidate'") == [
        ("published",)
    ]
    assert await world.inv.consume_once() == 0


async def test_refusals(world: World) -> None:
    with pytest.raises(errors.ValidationFailed):
        await world.inv.invalidate(None, ORG, "raw", start=5, end=5)
    with pytest.raises(errors.ValidationFailed):
        await world.inv.invalidate(None, ORG, "raw", start=0, end=10, key="x")
    with pytest.raises(errors.NotFound):
        await world.inv.invalidate(None, ORG, "nope", start=0, end=10)
    bob = await world.dags.user_caller(ORG, "bob")
    with pytest.raises(errors.Forbidden):
        await world.inv.invalidate(bob, ORG, "raw", start=0, end=10)
    alice = await world.dags.user_caller(ORG, "alice")
    report = await world.inv.invalidate(alice, ORG, "raw", start=0, end=10)
    assert report.reruns == ()


async def test_the_invalidate_route(world: World, tmp_path: Path) -> None:
    await _source(world, commits=[(0, 10)], announces=[(0, 10)])
    await _source(world, commits=[(0, 10)])
    issuer = LocalUserIssuer.init(tmp_path / "keys")
    auth = UserAuthenticator({issuer.key.kid: issuer.key})
    alice, bob = ({"Authorization": f"Bearer {issuer.token(s)}"} for s in ("alice", "bob"))
    path = f"/v1/orgs/{ORG}/datasets/raw/invalidate"
    app = make_app(world.d, platform_token="platform-token-for-tests-0123456789", user_auth=auth)
    async with TestClient(TestServer(app)) as c:
        r = await c.post(path, json={"start": 0, "end": 10})
        assert r.status == 401
        r = await c.post(path, json={"start": 0, "end": 10}, headers=bob)
        assert r.status == 403
        for bad, field in [
            ({"start": 10, "end": 5}, "start"),
            ({"start": 0}, "start"),
            ({"start": 0, "end": 2**63}, "end"),
            ({"start": True, "end": 5}, "start"),
            ({"key": "k", "version": "nope"}, "version"),
            ({"start": 0, "end": 10, "extra": 1}, None),
        ]:
            r = await c.post(path, json=bad, headers=alice)
            body = await r.json()
            assert r.status == 422, (bad, body)
            assert field is None or body["field"] == field, (bad, body)
        assert len(world.tasks_of("b")) == 1  # nothing written
        r = await c.post(
            f"/v1/orgs/{ORG}/datasets/nope/invalidate", json={"key": "k"}, headers=alice
        )
        assert r.status == 404 and (await r.json())["field"] == "dataset"
        r = await c.post(path, json={"start": 0, "end": 10}, headers=alice)
        body = await r.json()
        assert r.status == 200, body
        assert [x["job"] for x in body["reruns"]] == ["b"] and body["dependents"] == 1
    assert len(world.tasks_of("b")) == 2
