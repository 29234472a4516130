"""Deploying DAG files on real Postgres: immutable versions by digest, the diff against the
active version, registered datasets, every problem refused with nothing written, the deployer
role; and the same over HTTP (``/v1/orgs/{org}/dags``) with user JWTs."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from aiohttp.test_utils import TestClient, TestServer

from pg_sql import sql
from trace_core import errors
from trace_core.testing import MemoryObjectStore, MemoryQueue, MemorySigner
from trace_lite.dag_remat import DagRemat
from trace_lite.dags import Dags
from trace_lite.datasets import Datasets
from trace_lite.dispatcher import Dispatcher, open_pool
from trace_lite.users import LocalUserIssuer, UserAuthenticator
from trace_servers.app import make_app
from trace_servers.dag_cli import builtin_operators

ORG, OTHER = "acme", "globex"
PLATFORM = "platform-token-for-tests-0123456789"
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "dags" / "blocks.yaml"


def example() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    return doc


@pytest.fixture
async def dags(db_url: str) -> AsyncIterator[Dags]:
    pool = await open_pool(db_url, min_size=1, max_size=6)
    ds = Datasets(pool, object_store=MemoryObjectStore())
    await ds.set_member(None, ORG, "alice", ["admin"])
    await ds.set_member(None, ORG, "dora", ["dag_deployer"])
    await ds.set_member(None, ORG, "bob", [])
    await ds.set_member(None, OTHER, "eve", ["admin"])
    try:
        yield Dags(pool, operators=builtin_operators())
    finally:
        await pool.close()


async def test_deploy_stores_a_version_once_per_digest(dags: Dags, db_url: str) -> None:
    first = await dags.deploy(None, ORG, example())
    assert (first.version, first.previous_version, first.created) == (1, None, True)
    assert first.rebuild == ["blocks", "ranges"]
    # The same meaning again (keys reordered, a default spelled out): no new version.
    again = dict(reversed(list(example().items())))
    again["jobs"]["ranges"]["runtime"] = "worker"
    same = await dags.deploy(None, ORG, again)
    assert (same.version, same.created, same.digest) == (1, False, first.digest)
    assert sql(db_url, "SELECT count(*) FROM dag_versions") == [(1,)]
    jobs = sql(db_url, "SELECT job, operator, timeout_s FROM dag_jobs ORDER BY job")
    assert jobs == [("blocks", "stage_output", 60), ("ranges", "emit_events", 30)]
    edges = sql(db_url, "SELECT job, input_index, from_job, from_output FROM dag_inputs")
    assert edges == [("blocks", 0, "ranges", 0)]
    (registered,) = sql(
        db_url,
        "SELECT d.name, g.name, d.job_name, d.output_index, d.storage_kind, d.update_strategy "
        "FROM datasets d JOIN dags g USING (dag_id)",
    )
    assert registered == ("blocks", "blocks_demo", "blocks", 0, "parquet", "replace")
    assert sql(db_url, "SELECT active_version FROM dags WHERE name = 'blocks_demo'") == [(1,)]
    # the new dataset has an empty first version in the DAG's active pointer set
    assert active_pointers(db_url) == [("blocks", 1)]


def active_pointers(db_url: str) -> list[tuple[str, int]]:
    """(dataset, generation) of every pointer in the active pointer sets."""
    return sql(
        db_url,
        "SELECT d.name, p.generation FROM dag_pointers p JOIN dags g ON g.dag_id = p.dag_id "
        "AND g.active_generation = p.generation JOIN datasets d USING (dataset_uuid) ORDER BY 1",
    )


async def test_a_newly_published_dataset_gets_a_first_version(dags: Dags, db_url: str) -> None:
    await dags.deploy(None, ORG, example())
    (before,) = sql(db_url, "SELECT dataset_version FROM dag_pointers")
    more = example()
    more["publish"].append({"job": "ranges", "output": 0, "dataset": "ranges"})
    await dags.deploy(None, ORG, more)
    assert active_pointers(db_url) == [("blocks", 2), ("ranges", 2)]
    (kept,) = sql(
        db_url,
        "SELECT p.dataset_version FROM dag_pointers p JOIN datasets d USING (dataset_uuid) "
        "WHERE d.name = 'blocks' AND p.generation = 2",
    )
    assert kept == before  # blocks keeps its version: nothing is rebuilt


async def test_diff_against_the_active_version(dags: Dags, db_url: str) -> None:
    await dags.deploy(None, ORG, example())
    edited = example()
    edited["jobs"]["ranges"]["config"] = {"n": 5}
    preview = await dags.deploy(None, ORG, edited, dry_run=True)
    assert (preview.created, preview.version, preview.dry_run) == (False, 1, True)
    assert [(c["path"], c["kind"]) for c in preview.changes] == [
        ("jobs.ranges.config", "materialization")
    ]
    assert preview.rebuild == ["blocks", "ranges"]
    assert sql(db_url, "SELECT count(*) FROM dag_versions") == [(1,)]  # a dry run writes nothing
    v2 = await dags.deploy(None, ORG, edited)
    # a materialization-affecting edit is staged (rebuilt beside v1; nothing ran: no tasks to
    # replay) and goes live at the cutover (test_dag_remat.py)
    assert (v2.version, v2.staged_version, v2.previous_version, v2.created) == (1, 2, 1, True)
    assert [c.version for c in await DagRemat(dags.pool).cutover_once()] == [2]
    timeout_only = copy.deepcopy(edited)
    timeout_only["jobs"]["blocks"]["timeout"] = 90
    v3 = await dags.deploy(None, ORG, timeout_only)
    assert [(c["path"], c["kind"]) for c in v3.changes] == [("jobs.blocks.timeout", "execution")]
    assert (v3.version, v3.rebuild) == (3, [])
    versions = await dags.versions(None, ORG, "blocks_demo")
    assert [(v["version"], v["active"]) for v in versions] == [(3, True), (2, False), (1, False)]
    shown = await dags.show(None, ORG, "blocks_demo")
    assert shown["spec"]["jobs"]["blocks"]["timeout"] == 90
    assert [d["name"] for d in shown["datasets"]] == ["blocks"]


async def test_versions_are_immutable(dags: Dags, db_url: str) -> None:
    await dags.deploy(None, ORG, example())
    with pytest.raises(psycopg.errors.CheckViolation):
        sql(db_url, "UPDATE dag_versions SET created_by = 'mallory'")
    with pytest.raises(psycopg.errors.CheckViolation):
        sql(db_url, "DELETE FROM dag_versions")


async def test_every_problem_refused_and_nothing_written(dags: Dags, db_url: str) -> None:
    bad = example()
    bad["jobs"]["ranges"]["operator"] = "no_such_operator"
    bad["jobs"]["blocks"]["inputs"][0]["from"]["job"] = "rangez"
    bad["jobs"]["blocks"]["execution_strategy"] = "Bulk"
    with pytest.raises(errors.ValidationFailed) as info:
        await dags.deploy(None, ORG, bad)
    paths = {p["path"] for p in info.value.details["problems"]}
    assert {
        "jobs.ranges.operator",
        "jobs.blocks.inputs[0].from.job",
        "jobs.blocks.execution_strategy",
    } <= paths
    assert all(p["message"] for p in info.value.details["problems"])
    assert info.value.field in paths
    assert sql(db_url, "SELECT count(*) FROM dags") == [(0,)]
    assert sql(db_url, "SELECT count(*) FROM dag_versions") == [(0,)]


async def test_a_dataset_has_one_producing_dag(dags: Dags, db_url: str) -> None:
    await dags.deploy(None, ORG, example())
    thief = example()
    thief["name"] = "another"
    with pytest.raises(errors.ValidationFailed) as info:
        await dags.deploy(None, ORG, thief)
    assert info.value.field == "publish[0].dataset"
    assert "blocks_demo" in info.value.details["problems"][0]["message"]
    assert sql(db_url, "SELECT count(*) FROM dags WHERE name = 'another'") == [(0,)]
    # Another org has its own namespace.
    assert (await dags.deploy(None, OTHER, thief)).created


async def test_only_deployers_deploy(dags: Dags) -> None:
    bob = await dags.user_caller(ORG, "bob")
    with pytest.raises(errors.Forbidden):
        await dags.deploy(bob, ORG, example())
    # Refused before the document is looked at: a non-deployer learns nothing of its problems.
    with pytest.raises(errors.Forbidden):
        await dags.deploy(bob, ORG, {"name": "x", "jobs": 3})
    eve = await dags.user_caller(OTHER, "eve")
    with pytest.raises(errors.NotFound):
        await dags.deploy(eve, ORG, example())
    dora = await dags.user_caller(ORG, "dora")
    first = await dags.deploy(dora, ORG, example())
    assert first.created
    assert (await dags.versions(None, ORG, "blocks_demo"))[0]["created_by"] == "dora"
    # The first deployer becomes a deployer of the DAG: with the org role gone, still allowed.
    await dags.orgs.set_member(None, ORG, "dora", [])
    dora = await dags.user_caller(ORG, "dora")
    edited = example()
    edited["description"] = "edited"
    assert (await dags.deploy(dora, ORG, edited)).version == 2
    alice = await dags.user_caller(ORG, "alice")
    edited["description"] = "edited again"
    assert (await dags.deploy(alice, ORG, edited)).version == 3
    # Members read the DAGs of their org.
    assert [d["name"] for d in await dags.list_dags(bob, ORG)] == ["blocks_demo"]
    with pytest.raises(errors.NotFound):
        await dags.list_dags(eve, ORG)


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_dag_routes_over_http(db_url: str, tmp_path: Path) -> None:
    pool = await open_pool(db_url, min_size=1, max_size=6)
    d = Dispatcher(
        pool, signer=MemorySigner(), queue=MemoryQueue("t"), object_store=MemoryObjectStore()
    )
    ds = Datasets(pool, object_store=MemoryObjectStore())
    await ds.set_member(None, ORG, "dora", ["dag_deployer"])
    await ds.set_member(None, ORG, "bob", [])
    issuer = LocalUserIssuer.init(tmp_path / "keys")
    auth = UserAuthenticator({issuer.key.kid: issuer.key})
    dora, bob = _bearer(issuer.token("dora")), _bearer(issuer.token("bob"))
    base = f"/v1/orgs/{ORG}/dags"
    try:
        async with TestClient(
            TestServer(make_app(d, platform_token=PLATFORM, user_auth=auth))
        ) as c:
            r = await c.post(base, json={"spec": example()})
            assert r.status == 401
            r = await c.post(base, json={"spec": example()}, headers=bob)
            assert r.status == 403
            bad = example()
            bad["jobs"]["ranges"]["operator"] = "nope"
            r = await c.post(base, json={"spec": bad}, headers=dora)
            body = await r.json()
            assert r.status == 422
            assert body["error"] == "validation_failed"
            assert body["field"] == "jobs.ranges.operator"
            (problem,) = body["details"]["problems"]
            assert problem["path"] == "jobs.ranges.operator" and problem["hint"]
            r = await c.post(base, json={"spec": example(), "extra": 1}, headers=dora)
            assert r.status == 422 and (await r.json())["field"]
            r = await c.post(f"{base}?dry_run=maybe", json={"spec": example()}, headers=dora)
            assert r.status == 422 and (await r.json())["field"] == "dry_run"
            r = await c.post(f"{base}?dry_run=true", json={"spec": example()}, headers=dora)
            assert r.status == 200 and (await r.json())["version"] is None
            r = await c.post(base, json={"spec": example()}, headers=dora)
            assert r.status == 201 and (await r.json())["version"] == 1
            r = await c.post(base, json={"spec": example()}, headers=dora)
            assert r.status == 200 and (await r.json())["created"] is False
            r = await c.get(base, headers=bob)
            assert [x["name"] for x in (await r.json())["dags"]] == ["blocks_demo"]
            r = await c.get(f"{base}/blocks_demo", headers=bob)
            assert (await r.json())["spec"]["name"] == "blocks_demo"
            r = await c.get(f"{base}/blocks_demo/versions", headers=bob)
            assert [v["version"] for v in (await r.json())["versions"]] == [1]
            r = await c.get(f"{base}/nope", headers=bob)
            assert r.status == 404
            trigger = f"{base}/blocks_demo/jobs/ranges/trigger"
            r = await c.post(trigger, json={"run_id": "r1", "payload": {"n": 1}}, headers=dora)
            assert r.status == 201
            task_id = (await r.json())["task_id"]
            r = await c.post(trigger, json={"run_id": "r1"}, headers=dora)
            assert r.status == 200 and (await r.json())["task_id"] == task_id
            r = await c.post(trigger, json={}, headers=bob)
            assert r.status == 403
            r = await c.post(trigger, json={"payload": [1]}, headers=dora)
            assert r.status == 422 and (await r.json())["field"] == "payload"
            r = await c.post(f"{base}/blocks_demo/jobs/blocks/trigger", json={}, headers=dora)
            assert r.status == 422 and (await r.json())["field"] == "job"
        assert sql(db_url, "SELECT count(*) FROM dag_versions") == [(1,)]
        assert sql(db_url, "SELECT dag_job, payload FROM tasks") == [("ranges", {"n": 1})]
    finally:
        await pool.close()


async def test_concurrent_deploys_serialize(dags: Dags, db_url: str) -> None:
    """Deploys of one DAG take its row's lock: each distinct document gets its own version
    number, none is lost, and the first deploys of a new DAG race to one DAG row."""
    docs = []
    for i in range(6):
        doc = example()
        doc["description"] = f"edit {i}"
        docs.append(doc)
    results = await asyncio.gather(*(dags.deploy(None, ORG, d) for d in docs))
    assert sorted(r.version for r in results if r.version is not None) == [1, 2, 3, 4, 5, 6]
    assert all(r.created for r in results)
    assert sql(db_url, "SELECT count(*) FROM dags") == [(1,)]
    (active,) = sql(db_url, "SELECT active_version FROM dags")
    assert active == (6,)
    # each version's previous_version is the one active when its transaction took the lock
    assert sorted(r.previous_version or 0 for r in results) == [0, 1, 2, 3, 4, 5]
    assert active_pointers(db_url) == [("blocks", 1)]
