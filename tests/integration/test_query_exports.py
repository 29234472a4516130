# ruff: noqa: F811  (the fixtures world and api come from test_query_service)
"""Batch exports of the Query Service on real Postgres, the LocalObjectStore and real sandbox
processes: results under the org's results prefix, limits, status, cancellation (the sandbox
killed, from this server or another), abandoned runs, retention."""

from __future__ import annotations

import asyncio
import io
import os
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from test_query_service import ORG, World, api, world  # noqa: F401  (fixtures)

from trace_core import errors
from trace_lite.query import Limits, QueryService
from trace_lite.query.exports import QueryExports
from trace_servers.query_api import EXPORTS_KEY

SLOW = "SELECT count(*) FROM (SELECT unnest(range(3000)) a), (SELECT unnest(range(3000000)) b)"


def _bearer(issuer: Any, who: str = "ann") -> dict[str, str]:
    return {"Authorization": f"Bearer {issuer.token(who)}"}


def _sandboxes() -> int:
    """Sandbox processes this test process started and that still run."""
    me, n = os.getpid(), 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        state = stat.rsplit(")", 1)[1].split()[0]
        if ppid == me and state != "Z" and b"trace_lite.query.sandbox" in cmdline:
            n += 1
    return n


async def _until_a_sandbox_runs() -> None:
    while _sandboxes() == 0:  # noqa: ASYNC110  (another process's state: nothing to await)
        await asyncio.sleep(0.05)


async def _results(world: World) -> list[str]:
    org_id = await world.ds.org_id(ORG)
    return [o.key for o in await world.store.list(f"org/{org_id}/results/")]


async def test_export_to_parquet_and_csv_over_http(world: World, api: Any) -> None:
    c, issuer = api
    exports = c.server.app[EXPORTS_KEY]
    sql = "SELECT n, tag FROM shared ORDER BY n"
    r = await c.post("/v1/query/exports", headers=_bearer(issuer), json={"org": ORG, "sql": sql})
    assert r.status == 202, await r.text()
    started = await r.json()
    assert started["state"] == "running" and started["url"] is None
    await exports.wait(started["export_id"])
    r = await c.get(f"/v1/query/exports/{started['export_id']}", headers=_bearer(issuer))
    done = await r.json()
    assert (done["state"], done["rows"], done["truncated"]) == ("succeeded", 5, False)
    assert list(done["versions"]) == ["shared"] and done["url"]
    org_id = await world.ds.org_id(ORG)
    key = f"org/{org_id}/results/{started['export_id']}.parquet"
    assert await _results(world) == [key]
    table = pq.read_table(io.BytesIO(await world.store.get(key)))
    assert table.to_pylist() == [{"n": i, "tag": "v1"} for i in range(5)]
    assert done["bytes"] == len(await world.store.get(key))
    # CSV, with the row cap
    r = await c.post(
        "/v1/query/exports",
        headers=_bearer(issuer),
        json={"org": ORG, "sql": sql, "format": "csv", "max_rows": 2},
    )
    export_id = (await r.json())["export_id"]
    await exports.wait(export_id)
    done = await (await c.get(f"/v1/query/exports/{export_id}", headers=_bearer(issuer))).json()
    assert (done["state"], done["rows"], done["truncated"]) == ("succeeded", 2, True)
    text = (await world.store.get(f"org/{org_id}/results/{export_id}.csv")).decode()
    assert text.splitlines() == ['"n","tag"', '0,"v1"', '1,"v1"']
    # another user does not see it; a malformed id is not found either
    for who, path in (("bob", export_id), ("ann", "not-a-uuid")):
        r = await c.get(f"/v1/query/exports/{path}", headers=_bearer(issuer, who))
        assert r.status == 404
    assert world.sql("SELECT count(*) FROM dataset_pins")[0][0] == 0


async def test_refused_exports_record_nothing(world: World, api: Any) -> None:
    c, issuer = api
    for body, status, field in (
        ({"org": ORG, "sql": "SELECT version()"}, 422, "sql"),
        ({"org": ORG, "sql": "COPY shared TO 'x'"}, 422, "sql"),
        ({"org": ORG, "sql": "SELECT 1", "format": "json"}, 422, "format"),
        ({"org": ORG, "sql": "SELECT 1", "max_rows": -1}, 422, "max_rows"),
    ):
        r = await c.post("/v1/query/exports", headers=_bearer(issuer), json=body)
        assert (r.status, (await r.json())["field"]) == (status, field)
    r = await c.post("/v1/query/exports", json={"org": ORG, "sql": "SELECT 1"})
    assert r.status == 401
    assert world.sql("SELECT count(*) FROM query_exports") == [(0,)]


async def test_an_unreadable_dataset_fails_the_export_naming_none(world: World) -> None:
    exports = QueryExports(world.q, world.ds, world.store)
    ann = await world.ds.user_caller(ORG, "ann")
    status = await exports.start(ann, ORG, "SELECT * FROM private")
    await exports.wait(status.export_id)
    status = await exports.status("ann", status.export_id)
    assert status.state == "failed"
    assert status.error == {"error": "not_found", "message": "dataset not found or not readable"}
    assert await _results(world) == []


async def test_byte_limit_fails_the_export_and_stores_nothing(world: World) -> None:
    exports = QueryExports(
        world.q,
        world.ds,
        world.store,
        limits=Limits(deadline_s=20, max_rows=10**6, max_bytes=10_000),
    )
    ann = await world.ds.user_caller(ORG, "ann")
    status = await exports.start(ann, ORG, "SELECT unnest(range(100000)) AS i")
    await exports.wait(status.export_id)
    status = await exports.status("ann", status.export_id)
    assert (status.state, status.error["error"]) == ("failed", "payload_too_large")  # type: ignore[index]
    assert await _results(world) == []


async def test_cancel_kills_the_sandbox_and_stores_nothing(world: World) -> None:
    service = QueryService(world.ds, world.store)  # no pool: the only sandboxes are the export's
    exports = QueryExports(service, world.ds, world.store)
    ann = await world.ds.user_caller(ORG, "ann")
    status = await exports.start(ann, ORG, SLOW)
    await _until_a_sandbox_runs()
    canceled = await exports.cancel("ann", status.export_id)
    assert canceled.state == "canceled" and canceled.finished_at
    assert _sandboxes() == 0
    with pytest.raises(errors.Conflict):
        await exports.cancel("ann", status.export_id)
    with pytest.raises(errors.NotFound):
        await exports.cancel("bob", status.export_id)
    assert await _results(world) == []
    assert world.sql("SELECT count(*) FROM dataset_pins")[0][0] == 0


async def test_a_cancel_on_another_server_stops_the_run(world: World) -> None:
    """Two servers share the database: B cancels what A runs; A sees it on its next poll and
    kills its sandbox; the export ends canceled, nothing stored."""
    a = QueryExports(QueryService(world.ds, world.store), world.ds, world.store, poll_s=0.1)
    b = QueryExports(QueryService(world.ds, world.store), world.ds, world.store)
    ann = await world.ds.user_caller(ORG, "ann")
    status = await a.start(ann, ORG, SLOW)
    await _until_a_sandbox_runs()
    assert (await b.cancel("ann", status.export_id)).state == "canceled"
    await a.wait(status.export_id)
    assert _sandboxes() == 0
    assert (await a.status("ann", status.export_id)).state == "canceled"
    assert await _results(world) == []


async def test_an_export_whose_server_died_is_failed_as_abandoned(world: World) -> None:
    exports = QueryExports(QueryService(world.ds, world.store), world.ds, world.store)
    ann = await world.ds.user_caller(ORG, "ann")
    status = await exports.start(ann, ORG, SLOW)
    await exports.close()  # this server stops: its run ends abandoned
    assert (await exports.status("ann", status.export_id)).error == {
        "error": "abandoned",
        "message": "the export's server stopped before it ended",
    }
    # a row left running past its deadline (a server killed outright) is failed when read
    org_id = await world.ds.org_id(ORG)
    world.sql(
        "INSERT INTO query_exports (export_id, org_id, requested_by, sql, format, max_rows, "
        "deadline_at, expires_at) VALUES (gen_random_uuid(), %s, 'ann', 'SELECT 1', 'csv', 1, "
        "now() - interval '1 s', now() + interval '1 day') RETURNING export_id",
        (org_id,),
    )
    (export_id,) = world.sql("SELECT export_id::text FROM query_exports WHERE sql = 'SELECT 1'")[0]
    status = await exports.status("ann", export_id)
    assert (status.state, status.error["error"]) == ("failed", "abandoned")  # type: ignore[index]


async def test_retention_purges_results_and_rows(world: World) -> None:
    exports = QueryExports(world.q, world.ds, world.store)
    ann = await world.ds.user_caller(ORG, "ann")
    kept = await exports.start(ann, ORG, "SELECT 1 AS x")
    old = await exports.start(ann, ORG, "SELECT 2 AS x")
    for s in (kept, old):
        await exports.wait(s.export_id)
    world.sql(
        "UPDATE query_exports SET expires_at = now() - interval '1 s' WHERE export_id = %s",
        (old.export_id,),
    )
    assert await exports.purge_expired() == 1
    results = await _results(world)
    assert len(results) == 1 and kept.export_id in results[0]
    with pytest.raises(errors.NotFound):
        await exports.status("ann", old.export_id)
