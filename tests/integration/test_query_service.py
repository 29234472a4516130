"""The Query Service on real Postgres, the real LocalObjectStore and real sandbox processes:
pins across a cutover, the datasets permission matrix through the query path, other orgs."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import duckdb
import psycopg
import pytest
from aiohttp.test_utils import TestClient, TestServer

from pg_sql import sql as pg_sql
from trace_core import errors, wire
from trace_core.access import Caller
from trace_core.lifecycle import RetryPolicy
from trace_core.query_gate import NOT_READABLE
from trace_core.testing import MemoryQueue, MemorySigner
from trace_core.token import issue_claims
from trace_lite.datasets import Datasets
from trace_lite.dispatcher import Dispatcher, open_pool
from trace_lite.local_store import LocalObjectStore
from trace_lite.query import Limits, QueryOutcome, QueryService, SandboxResult
from trace_lite.users import LocalUserIssuer, UserAuthenticator
from trace_servers.app import make_app

ORG, OTHER, DAG = "acme", "globex", "prices"
SECRET = "GLOBEX-ONLY-ROW"


@attrs.define
class World:
    d: Dispatcher
    ds: Datasets
    store: LocalObjectStore
    q: QueryService
    db_url: str
    tmp: Path

    def sql(self, query: str, params: Any = None) -> list[tuple[Any, ...]]:
        return pg_sql(self.db_url, query, params)


def _parquet(tmp: Path, select: str) -> bytes:
    path = tmp / f"{time.monotonic_ns()}.parquet"
    duckdb.sql(f"COPY ({select}) TO '{path}' (FORMAT parquet)")
    data = path.read_bytes()
    path.unlink()
    return data


async def publish(w: World, org: str, dag: str, tags: dict[str, str]) -> dict[str, str]:
    """Write a new version of each dataset (5 rows tagged ``tag``) through a task's completion,
    promote it, and return the versions (not cut over yet)."""
    versions = {name: await w.ds.open_version(None, org, name) for name in tags}
    (info,) = await w.d.create_tasks([wire.CreateTaskRequest(operator="stage", org=org)])
    c = await w.d.claim(info.task_id)
    payload = await w.d.fetch(info.task_id, c.attempt)
    outputs = []
    for name, tag in tags.items():
        data = _parquet(w.tmp, f"SELECT range AS n, '{tag}' AS tag FROM range(5)")
        key = f"{payload.staging_prefix}{name}/0_5.parquet"
        await w.store.put(key, data)
        outputs.append(
            {
                "dataset": name,
                "object_key": key,
                "size": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
                "partition": {"start": 0, "end": 5},
                "version": versions[name],
            }
        )
    fence = {"task_id": c.task_id, "attempt": c.attempt, "lease_token": c.lease_token}
    await w.d.complete(wire.structure({**fence, "outputs": outputs}, wire.CompleteRequest))
    while await w.ds.promote_once():
        pass
    return versions


@pytest.fixture
async def world(db_url: str, tmp_path: Path) -> AsyncIterator[World]:
    pool = await open_pool(db_url, min_size=2, max_size=8)
    store = LocalObjectStore(tmp_path / "objects", "http://127.0.0.1:1", b"s" * 32)
    d = Dispatcher(
        pool,
        signer=MemorySigner(),
        queue=MemoryQueue("tasks"),
        object_store=store,
        retry=RetryPolicy(max_attempts=3, base_s=0.0),
        rand=lambda: 0.5,
    )
    ds = Datasets(pool, object_store=store)
    q = QueryService(ds, store, limits=Limits(deadline_s=20.0, max_rows=100))
    w = World(d, ds, store, q, db_url, tmp_path)
    await ds.ensure_dag(ORG, DAG, deployers=["dave"])
    await ds.ensure_dag(OTHER, "other")
    await ds.set_member(None, ORG, "alice", ["admin"])
    await ds.set_member(None, ORG, "dave", [])
    await ds.set_member(None, ORG, "ann", ["analyst"])
    await ds.set_member(None, ORG, "bob", [])
    await ds.set_member(None, OTHER, "eve", ["admin", "analyst"])
    for name, roles in (("private", []), ("shared", ["analyst"])):
        await ds.register(ORG, name, dag=DAG, job="j", read_roles=roles)
    await ds.cutover(None, ORG, DAG, await publish(w, ORG, DAG, {"private": "v1", "shared": "v1"}))
    await ds.register(OTHER, "shared", dag="other", job="j", read_roles=["analyst"])
    await ds.cutover(None, OTHER, "other", await publish(w, OTHER, "other", {"shared": SECRET}))
    try:
        yield w
    finally:
        await pool.close()


async def test_query_reads_the_active_version_and_releases_its_pin(world: World) -> None:
    alice = await world.ds.user_caller(ORG, "alice")
    r = await world.q.query(alice, ORG, "SELECT tag, count(*) AS n FROM shared GROUP BY tag")
    assert (r.columns, r.rows) == (["tag", "n"], [["v1", 5]])
    assert world.sql("SELECT count(*) FROM dataset_pins")[0][0] == 0


async def test_row_cap(world: World) -> None:
    alice = await world.ds.user_caller(ORG, "alice")
    r = await world.q.query(alice, ORG, "SELECT * FROM shared ORDER BY n", max_rows=2)
    assert (r.rows, r.truncated) == ([[0, "v1"], [1, "v1"]], True)


class CutoverMidQuery(QueryService):
    """Cuts both datasets over to fresh versions after the query pinned, before it reads."""

    world: World
    moved: dict[str, str]

    async def _sandbox(
        self, sql: str, tables: Any, limits: Limits, s3: Any = None
    ) -> SandboxResult:
        w = self.world
        self.moved = await publish(w, ORG, DAG, {"private": "v2", "shared": "v2"})
        await w.ds.cutover(None, ORG, DAG, self.moved)
        return await super()._sandbox(sql, tables, limits, s3)


async def test_a_query_across_a_cutover_reads_one_pinned_version_only(world: World) -> None:
    q = CutoverMidQuery(world.ds, world.store)
    q.world = world
    alice = await world.ds.user_caller(ORG, "alice")
    res = await world.ds.resolve(alice, ORG, ["private", "shared"], pin_ttl_s=0)
    before = {d.dataset: d.dataset_version for d in res.datasets}
    sql = "SELECT p.tag AS a, s.tag AS b, count(*) AS n FROM private p JOIN shared s USING (n) GROUP BY ALL"
    r = await q.query(alice, ORG, sql)
    assert r.rows == [["v1", "v1", 5]]  # never v2, never a mix
    assert r.versions == before
    assert set(q.moved.values()).isdisjoint(r.versions.values())
    # the next query sees the new set, whole
    r2 = await world.q.query(alice, ORG, sql)
    assert r2.rows == [["v2", "v2", 5]] and r2.versions == q.moved


#: principal -> datasets it may read through the Query Service
READABLE = {
    "org_admin": {"private", "shared"},
    "dag_deployer": {"private", "shared"},
    "member_with_read_role": {"shared"},
    "member_without_role": set(),
    "task_with_grant": {"private", "shared"},
    "task_with_one_grant": {"shared"},
    "task_without_grant": set(),
}


async def _caller(w: World, principal: str) -> Caller:
    users = {
        "org_admin": "alice",
        "dag_deployer": "dave",
        "member_with_read_role": "ann",
        "member_without_role": "bob",
    }
    if principal in users:
        return await w.ds.user_caller(ORG, users[principal])
    read = {
        "task_with_grant": ["private", "shared"],
        "task_with_one_grant": ["shared"],
        "task_without_grant": [],
    }[principal]
    (task,) = await w.d.create_tasks([wire.CreateTaskRequest(operator="x", org=ORG)])
    claims = issue_claims(
        w.d.token_policy,
        org_id=await w.ds.org_id(ORG),
        task_id=task.task_id,
        attempt=1,
        attempt_timeout_s=60,
        now_epoch=int(time.time()),
        jti="j",
        grants={"datasets": {"read": read}},
    )
    verified = await w.d.authorize(await w.d.issuer.encode(claims), claims.task_id, 1)
    return w.ds.task_caller(verified)


@pytest.mark.parametrize("principal", list(READABLE))
async def test_permission_matrix_through_the_query_path(world: World, principal: str) -> None:
    caller = await _caller(world, principal)
    for dataset in ("private", "shared"):
        sql = f"SELECT count(*) FROM {dataset}"
        if dataset in READABLE[principal]:
            assert (await world.q.query(caller, ORG, sql)).rows == [[5]]
        else:
            with pytest.raises(errors.NotFound) as info:
                await world.q.query(caller, ORG, sql)
            assert (info.value.message, info.value.field) == (NOT_READABLE, "sql")
    # a join naming one readable and one unreadable dataset is refused whole, naming neither
    if READABLE[principal] != {"private", "shared"}:
        with pytest.raises(errors.NotFound, match=f"^{NOT_READABLE}$"):
            await world.q.query(caller, ORG, "SELECT * FROM shared, private")
    assert world.sql("SELECT count(*) FROM dataset_pins")[0][0] == 0


async def test_another_orgs_data_is_never_reachable(world: World) -> None:
    eve = await world.ds.user_caller(OTHER, "eve")
    # her own org's dataset of the same name: her rows only
    r = await world.q.query(eve, OTHER, "SELECT DISTINCT tag FROM shared")
    assert r.rows == [[SECRET]]
    # acme's, through acme: she is no member there
    with pytest.raises(errors.NotFound):
        await world.q.query(eve, ORG, "SELECT * FROM shared")
    # and acme's admin never sees globex's rows through any name
    alice = await world.ds.user_caller(ORG, "alice")
    r = await world.q.query(alice, ORG, "SELECT DISTINCT tag FROM shared")
    assert r.rows == [["v1"]]
    with pytest.raises(errors.NotFound):
        await world.q.query(alice, OTHER, "SELECT * FROM shared")


# --- over HTTP ---------------------------------------------------------------------------------

PLATFORM = "platform-token-for-tests-0123456789"


@pytest.fixture
async def api(world: World) -> AsyncIterator[tuple[TestClient[Any, Any], LocalUserIssuer]]:
    issuer = LocalUserIssuer.init(world.tmp / "keys")
    auth = UserAuthenticator({issuer.key.kid: issuer.key})
    app = make_app(world.d, platform_token=PLATFORM, user_auth=auth)
    async with TestClient(TestServer(app)) as c:
        yield c, issuer


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_user_query_over_http(
    world: World, api: tuple[TestClient[Any, Any], LocalUserIssuer]
) -> None:
    c, issuer = api
    ann, bob = issuer.token("ann"), issuer.token("bob")
    sql = "SELECT tag, count(*) AS n FROM shared GROUP BY tag"
    r = await c.post("/v1/query", headers=_bearer(ann), json={"org": ORG, "sql": sql})
    body = await r.json()
    assert r.status == 200, body
    assert body["columns"] == [{"name": "tag", "type": "VARCHAR"}, {"name": "n", "type": "BIGINT"}]
    assert (body["rows"], body["truncated"]) == ([["v1", 5]], False)
    assert list(body["versions"]) == ["shared"]
    # CSV with the row cap
    r = await c.post(
        "/v1/query",
        headers=_bearer(ann),
        json={
            "org": ORG,
            "sql": "SELECT n, tag FROM shared ORDER BY n",
            "format": "csv",
            "max_rows": 2,
        },
    )
    assert r.status == 200 and r.content_type == "text/csv"
    assert await r.text() == "n,tag\n0,v1\n1,v1\n"
    assert r.headers["X-Trace-Truncated"] == "true"
    # not readable (no role), unknown, another org's: one 404 naming nothing
    for who, org, q in (
        (ann, ORG, "SELECT * FROM private"),
        (ann, ORG, "SELECT * FROM nope"),
        (bob, ORG, "SELECT * FROM shared"),
        (ann, OTHER, "SELECT * FROM shared"),
    ):
        r = await c.post("/v1/query", headers=_bearer(who), json={"org": org, "sql": q})
        assert r.status == 404, await r.text()
        body = await r.json()
        assert body["error"] == "not_found"
        assert "private" not in body["message"] and "nope" not in body["message"]
    # refused constructs and syntax errors: 422 on field sql
    for q in ("COPY shared TO '/tmp/x'", "SELECT * FROM read_text('/etc/passwd')", "SELEC 1"):
        r = await c.post("/v1/query", headers=_bearer(ann), json={"org": ORG, "sql": q})
        body = await r.json()
        assert (r.status, body["error"], body["field"]) == (422, "validation_failed", "sql")
    # bad bodies: 422 naming the field; no token: 401 before the body is read
    for bad, field in (
        ({"org": ORG}, "sql"),
        ({"org": ORG, "sql": "SELECT 1", "format": "xml"}, "format"),
    ):
        r = await c.post("/v1/query", headers=_bearer(ann), json=bad)
        body = await r.json()
        assert (r.status, body["field"]) == (422, field), body
    r = await c.post("/v1/query", json={"org": ORG, "sql": "SELECT 1"})
    assert r.status == 401
    assert world.sql("SELECT count(*) FROM dataset_pins")[0][0] == 0


async def test_task_query_over_http_reads_only_granted_datasets(
    world: World, api: tuple[TestClient[Any, Any], LocalUserIssuer]
) -> None:
    c, issuer = api
    (info,) = await world.d.create_tasks(
        [wire.CreateTaskRequest(operator="x", org=ORG, read_datasets=["shared"])]
    )
    claim = await world.d.claim(info.task_id)
    headers = {"X-Trace-Task-Capability": claim.capability_token}
    fence = {"task_id": claim.task_id, "attempt": claim.attempt, "lease_token": claim.lease_token}
    r = await c.post(
        "/v1/task/query",
        headers=headers,
        json={**fence, "sql": "SELECT count(*) AS n FROM shared"},
    )
    assert r.status == 200, await r.text()
    assert (await r.json())["rows"] == [[5]]
    r = await c.post(
        "/v1/task/query", headers=headers, json={**fence, "sql": "SELECT * FROM private"}
    )
    assert r.status == 404
    # a user token is not a capability token
    r = await c.post(
        "/v1/task/query",
        headers={"X-Trace-Task-Capability": issuer.token("alice")},
        json={**fence, "sql": "SELECT 1"},
    )
    assert r.status == 401


async def test_task_query_binds_the_attempt_fence_and_reads_nothing_when_stale(
    world: World,
    api: tuple[TestClient[Any, Any], LocalUserIssuer],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Like ``/v1/task/resolve``: the body's fence must name the token's task and attempt
    (403) and be the task's current, running attempt with its lease token (409); a refused
    call runs no query at all (no ``trace.query`` line, no pin)."""
    c, _issuer = api
    (info,) = await world.d.create_tasks(
        [wire.CreateTaskRequest(operator="x", org=ORG, read_datasets=["shared"])]
    )
    (other,) = await world.d.create_tasks(
        [wire.CreateTaskRequest(operator="x", org=ORG, read_datasets=["shared"])]
    )
    first = await world.d.claim(info.task_id)
    mine = {"X-Trace-Task-Capability": first.capability_token}
    sql = {"sql": "SELECT count(*) AS n FROM shared"}

    def fence(claim: wire.ClaimResponse, **change: Any) -> dict[str, Any]:
        f = {"task_id": claim.task_id, "attempt": claim.attempt, "lease_token": claim.lease_token}
        return {**f, **change, **sql}

    async def refused(headers: dict[str, str], body: dict[str, Any]) -> tuple[int, str]:
        caplog.clear()
        with caplog.at_level("INFO", logger="trace.query"):
            r = await c.post("/v1/task/query", headers=headers, json=body)
        assert not [x for x in caplog.records if x.getMessage() == "query"]
        return r.status, (await r.json())["error"]

    # the fence is required (the wire shape of /v1/task/resolve)
    assert await refused(mine, sql) == (422, "validation_failed")
    # another task's fence, or another attempt's number, with this token: 403
    o = await world.d.claim(other.task_id)
    assert (await refused(mine, fence(o)))[0] == 403
    assert (await refused(mine, fence(first, attempt=2)))[0] == 403
    # the right task and attempt but not its lease token: 409
    wrong_lease = fence(first, lease_token="00000000-0000-4000-8000-000000000000")
    assert await refused(mine, wrong_lease) == (409, "lease_lost")
    # the attempt ends (fails, retryable) and a second attempt runs: the first one's token and
    # fence are stale and read nothing
    await world.d.complete(
        wire.CompleteRequest(
            task_id=first.task_id,
            attempt=1,
            lease_token=first.lease_token,
            outcome="failed",
            retryable=True,
        )
    )
    await world.d.reap_once()  # the retry falls due at once (backoff 0 s)
    second = await world.d.claim(info.task_id)
    assert second.attempt == 2
    assert (await refused(mine, fence(first)))[0] == 409
    r = await c.post(
        "/v1/task/query",
        headers={"X-Trace-Task-Capability": second.capability_token},
        json=fence(second),
    )
    assert r.status == 200, await r.text()
    assert world.sql("SELECT count(*) FROM dataset_pins")[0][0] == 0


class CountingService(QueryService):
    running = 0
    most = 0

    async def _spawn(self, sql: str, tables: Any, limits: Limits, s3: Any = None) -> SandboxResult:
        CountingService.running += 1
        CountingService.most = max(CountingService.most, CountingService.running)
        try:
            return await super()._spawn(sql, tables, limits, s3)
        finally:
            CountingService.running -= 1


async def test_sandboxes_run_at_most_concurrency_at_once(world: World) -> None:
    q = CountingService(world.ds, world.store, concurrency=2)
    alice = await world.ds.user_caller(ORG, "alice")
    results = await asyncio.gather(
        *(q.query(alice, ORG, "SELECT count(*) FROM shared") for _ in range(5))
    )
    assert [r.rows for r in results] == [[[5]]] * 5
    assert CountingService.most == 2
    assert world.sql("SELECT count(*) FROM dataset_pins")[0][0] == 0


async def test_postgres_table_dataset_is_copied_in_never_connected(
    world: World, data_db_url: str
) -> None:
    ds = world.ds
    await ds.register(
        ORG, "balances", dag=DAG, job="j", storage_kind="postgres", read_roles=["analyst"]
    )
    version = await ds.open_version(None, ORG, "balances")
    ann = await ds.user_caller(ORG, "ann")
    scratch = world.tmp / "query-scratch"
    scratch.mkdir()
    q = QueryService(ds, world.store, scratch_root=scratch, data_url=data_db_url)
    await ds.cutover(None, ORG, DAG, {"balances": version})
    # the Sink has not created the table yet: an empty table
    assert (await q.query(ann, ORG, "SELECT count(*) FROM balances")).rows == [[0]]
    table = f"dsv_{version.replace('-', '')}"
    with psycopg.connect(data_db_url, autocommit=True) as conn:
        conn.execute(
            f"CREATE TABLE data.{table} (account text, amount numeric, n bigint, "
            "seen timestamptz, ok boolean)"
        )
        conn.execute(
            f"INSERT INTO data.{table} VALUES "
            "('a,\"b\"', 115792089237316195423570985008687907853269984665640564039457584007913129639935, "
            "1, '2026-01-02 03:04:05+00', true), ('', 0, NULL, NULL, NULL)"
        )
    r = await q.query(ann, ORG, "SELECT * FROM balances ORDER BY n NULLS LAST")
    assert r.types == ["VARCHAR", "VARCHAR", "BIGINT", "TIMESTAMP WITH TIME ZONE", "BOOLEAN"]
    assert r.rows[0][:3] == [
        'a,"b"',
        "115792089237316195423570985008687907853269984665640564039457584007913129639935",
        1,
    ]
    assert r.rows[0][3].startswith("2026-01-02") and r.rows[0][4] is True
    assert r.rows[1] == ["", "0", None, None, None]  # empty string and NULL stay apart
    assert r.versions == {"balances": version}
    assert list(scratch.iterdir()) == []  # the export and the sandbox's directory are gone
    # without a data database the service refuses, saying why
    with pytest.raises(errors.ValidationFailed, match="no data database"):
        await world.q.query(ann, ORG, "SELECT * FROM balances")
    # and a member without the role gets the same 404 as for any unreadable name
    bob = await ds.user_caller(ORG, "bob")
    with pytest.raises(errors.NotFound, match=f"^{NOT_READABLE}$"):
        await q.query(bob, ORG, "SELECT * FROM balances")


async def test_make_app_hands_the_data_database_to_the_query_service(
    world: World, data_db_url: str
) -> None:
    ds = world.ds
    await ds.register(ORG, "balances", dag=DAG, job="j", storage_kind="postgres", read_roles=[])
    version = await ds.open_version(None, ORG, "balances")
    await ds.cutover(None, ORG, DAG, {"balances": version})
    with psycopg.connect(data_db_url, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE data.dsv_{version.replace('-', '')} (n bigint)")
        conn.execute(f"INSERT INTO data.dsv_{version.replace('-', '')} VALUES (7)")
    issuer = LocalUserIssuer.init(world.tmp / "keys")
    auth = UserAuthenticator({issuer.key.kid: issuer.key})
    app = make_app(world.d, platform_token=PLATFORM, user_auth=auth, data_url=data_db_url)
    async with TestClient(TestServer(app)) as c:
        r = await c.post(
            "/v1/query",
            headers=_bearer(issuer.token("alice")),
            json={"org": ORG, "sql": "SELECT n FROM balances"},
        )
        assert r.status == 200, await r.text()
        assert (await r.json())["rows"] == [[7]]


async def test_each_query_is_observed_once_with_its_outcome(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="trace.query")
    seen: list[QueryOutcome] = []
    # A generous deadline for the queries that must not time out (a loaded machine starts a
    # sandbox slowly), a short one for the query that must.
    q, short = (
        QueryService(
            world.ds,
            world.store,
            limits=Limits(deadline_s=deadline, max_rows=100, max_bytes=200_000),
            observe=seen.append,
        )
        for deadline in (60.0, 3.0)
    )
    alice = await world.ds.user_caller(ORG, "alice")
    bob = await world.ds.user_caller(ORG, "bob")
    attempts: list[tuple[QueryService, Caller, str]] = [
        (q, alice, "SELECT n FROM shared"),
        (q, alice, "SELECT * FROM read_text('/etc/passwd')"),
        (q, bob, "SELECT * FROM shared"),
        (
            short,
            alice,
            "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT count(*) FROM r",
        ),
        (q, alice, "SELECT repeat('x', 300000)"),
    ]
    for service, caller, sql in attempts:
        with contextlib.suppress(errors.TraceError):
            await service.query(caller, ORG, sql)
    assert [(o.outcome, o.rows) for o in seen] == [
        ("ok", 5),
        ("refused", 0),
        ("not_readable", 0),
        ("timed_out", 0),
        ("too_large", 0),
    ]
    assert seen[0].bytes > 0
    # one log line per query with its outcome, rows, bytes and latency (never the SQL text)
    lines = [r for r in caplog.records if r.name == "trace.query" and r.getMessage() == "query"]
    assert [(r.org, r.outcome, r.rows) for r in lines] == [  # type: ignore[attr-defined]
        (ORG, o.outcome, o.rows) for o in seen
    ]
    assert [r.bytes for r in lines] == [o.bytes for o in seen]  # type: ignore[attr-defined]
    assert all(r.latency_ms >= 0 for r in lines)  # type: ignore[attr-defined]
    assert not any("passwd" in str(r.__dict__) for r in lines)


async def test_metrics_count_queries_by_outcome(
    world: World, api: tuple[TestClient[Any, Any], LocalUserIssuer]
) -> None:
    c, issuer = api
    for sql in ("SELECT 1", "SELECT * FROM private"):
        await c.post(
            "/v1/query", headers=_bearer(issuer.token("ann")), json={"org": ORG, "sql": sql}
        )
    text = await (await c.get("/metrics")).text()
    assert 'trace_queries_total{outcome="ok"} 1.0' in text
    assert 'trace_queries_total{outcome="not_readable"} 1.0' in text
    assert "trace_query_rows_total 1.0" in text
