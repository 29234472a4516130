"""The Query Service over S3 (the AWS profile) on a moto server: DuckDB's httpfs, loaded from
the ``duckdb-ext-httpfs`` wheel by path (never downloaded), reads the pinned objects with a
temporary secret scoped to their prefixes, dropped before any user SQL runs.

The escape suite of ``test_query_sandbox`` runs again with the granted dataset in S3 (and its
lock-down subset with the gate off), plus S3 attempts: another org's object and the granted
object by URL, secrets, the endpoint itself. Nothing may leak (another org's row, the S3
secret key, paths) or be written (locally or to the bucket). Then the service itself: pins
across a cutover, another org's same-named dataset, streams and an export stored in S3.
"""

from __future__ import annotations

import asyncio
import io
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import attrs
import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_query_sandbox import CASES, LOCKDOWN, SECRET, Case
from test_query_service import (
    DAG,
    ORG,
    OTHER,
    READABLE,
    CutoverMidQuery,
    World,
    _caller,
    publish,
)

from trace_core import errors
from trace_core.lifecycle import RetryPolicy
from trace_core.testing import MemoryQueue, MemorySigner
from trace_lite.datasets import Datasets
from trace_lite.dispatcher import Dispatcher, open_pool
from trace_lite.query import Limits, QueryService, run_sandboxed
from trace_lite.query.exports import QueryExports
from trace_lite.query.s3 import S3Access

BUCKET = "trace-query"
#: S3 credentials handed to the sandbox (moto accepts any); must never appear in an answer
KEY_ID, SECRET_KEY = "AKIAQUERYCANARY", "S3-SECRET-KEY-CANARY-51a9"
FAST = Limits(deadline_s=30.0)
GRANTED_KEY = "org/o1/dataset/blocks/version/v1/0_5.parquet"
OTHER_KEY = "org/o2/dataset/blocks/version/v9/0_1.parquet"


def _canary_credentials() -> tuple[str, str, None]:
    return KEY_ID, SECRET_KEY, None


@pytest.fixture(scope="module")
def bucket(moto_server: Any) -> Iterator[Any]:
    from trace_aws.s3_store import S3ObjectStore

    S3ObjectStore.create_bucket(BUCKET, endpoint_url=moto_server.url)
    store = S3ObjectStore(BUCKET, endpoint_url=moto_server.url)
    con = duckdb.connect()
    for key, select in (
        (GRANTED_KEY, "SELECT range AS n, 'row' || range AS s FROM range(5)"),
        (OTHER_KEY, f"SELECT '{SECRET}' AS s"),
    ):
        buf = pa.BufferOutputStream()
        pq.write_table(con.sql(select).fetch_arrow_table(), buf)
        asyncio.run(store.put(key, buf.getvalue().to_pybytes()))
    yield store


class S3Paths:
    def __init__(self, tmp: Path, access: S3Access) -> None:
        self.tmp = tmp
        self.secret = tmp / "secret.csv"
        self.secret.write_text(f"k\n{SECRET}\n")
        self.written = tmp / "written"
        self.scratch = tmp / "scratch"
        self.scratch.mkdir()
        self.access = access

    def sql(self, template: str) -> str:
        return template.format(
            tmp=self.tmp,
            secret=self.secret,
            data=self.access.url(GRANTED_KEY),
            other=self.access.url(OTHER_KEY),
            written=self.written,
        )


@pytest.fixture
def s3paths(bucket: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> S3Paths:
    monkeypatch.setenv("TRACE_QUERY_CANARY", SECRET)
    access = S3Access.of_store(bucket)
    return S3Paths(tmp_path, attrs.evolve(access, credentials=_canary_credentials))


async def _objects(store: Any) -> list[str]:
    return [o.key for o in await store.list("")]


def _assert_clean(p: S3Paths, text: str) -> None:
    for canary in (SECRET, SECRET_KEY, KEY_ID, str(p.tmp)):
        assert canary not in text
    assert not p.written.exists()
    assert sorted(x.name for x in p.tmp.iterdir()) == ["scratch", "secret.csv"]
    for d in p.scratch.iterdir():
        assert list(d.iterdir()) == [], list(d.iterdir())


async def _attempt(p: S3Paths, sql: str, *, gate: bool) -> str:
    try:
        result = await run_sandboxed(
            p.sql(sql),
            {"blocks": [p.access.url(GRANTED_KEY)]},
            FAST,
            scratch_root=p.scratch,
            keep_scratch=True,
            gate=gate,
            s3=p.access.options([GRANTED_KEY]),
        )
    except (errors.ValidationFailed, errors.NotFound) as exc:
        assert exc.field == "sql"
        return exc.message
    pytest.fail(f"{sql!r} was not refused: {result}")


S3_CASES = [
    Case("s3_other_org", "SELECT * FROM read_parquet('{other}')", True),
    Case("s3_granted_by_url", "SELECT * FROM read_parquet('{data}')", True),
    Case("s3_replacement_scan", "SELECT * FROM '{other}'", True),
    Case("s3_glob_bucket", "SELECT * FROM glob('s3://trace-query/**')", True),
    Case("s3_own_secret", "CREATE SECRET x (TYPE s3, KEY_ID 'a', SECRET 'b', SCOPE 's3://')"),
    Case("s3_which_secret", "SELECT * FROM which_secret('{other}', 's3')"),
    Case("s3_secrets_table", "SELECT * FROM duckdb_secrets(redact => false)"),
    Case("s3_union_other", "SELECT s FROM blocks UNION ALL SELECT s FROM '{other}'", True),
]


@pytest.mark.parametrize("case", CASES + S3_CASES, ids=[c.id for c in CASES + S3_CASES])
async def test_escape_attempt_over_s3_is_refused(s3paths: S3Paths, bucket: Any, case: Case) -> None:
    before = await _objects(bucket)
    message = await _attempt(s3paths, case.sql, gate=True)
    _assert_clean(s3paths, message)
    assert await _objects(bucket) == before


#: With the gate off, ``LOAD httpfs`` is a no-op over S3 (the trusted set-up loaded it before
#: the lock-down); loading or installing anything else is still refused.
ALREADY_LOADED = {"load_httpfs", "select_then_load"}
S3_LOCKDOWN = [c for c in LOCKDOWN if c.id not in ALREADY_LOADED] + [
    c for c in S3_CASES if c.lockdown
]


@pytest.mark.parametrize("case", S3_LOCKDOWN, ids=[c.id for c in S3_LOCKDOWN])
async def test_lockdown_alone_refuses_over_s3(s3paths: S3Paths, bucket: Any, case: Case) -> None:
    """The gate off: the secret is gone and external access is off before the user SQL."""
    before = await _objects(bucket)
    message = await _attempt(s3paths, case.sql, gate=False)
    _assert_clean(s3paths, message)
    assert await _objects(bucket) == before


async def test_the_read_secret_is_gone_before_user_sql_runs(s3paths: S3Paths) -> None:
    """With the gate off, user SQL may list secrets: the server's S3 credential was dropped
    before the lock-down, so there is none to see or use."""
    for sql in (
        "SELECT count(*) FROM duckdb_secrets()",
        "SELECT count(*) FROM which_secret('{data}', 's3')",
    ):
        r = await run_sandboxed(
            s3paths.sql(sql),
            {"blocks": [s3paths.access.url(GRANTED_KEY)]},
            FAST,
            gate=False,
            s3=s3paths.access.options([GRANTED_KEY]),
        )
        assert r.rows == [[0]]


async def test_the_granted_dataset_reads_over_s3(s3paths: S3Paths) -> None:
    r = await run_sandboxed(
        "SELECT count(*) AS n, max(s) AS s FROM blocks",
        {"blocks": [s3paths.access.url(GRANTED_KEY)]},
        FAST,
        s3=s3paths.access.options([GRANTED_KEY]),
    )
    assert r.rows == [[5, "row4"]]
    options = s3paths.access.options([GRANTED_KEY])
    assert options["scope"] == ["s3://trace-query/org/o1/dataset/blocks/version/v1/"]
    assert Path(options["httpfs"]).name == "httpfs.duckdb_extension"


def test_sandbox_environment_over_s3_carries_no_credentials() -> None:
    from trace_lite.query.runner import _environment

    env = _environment(Path("/tmp/x"))
    assert not any(k.startswith("AWS_") for k in env)


# --- the service over S3 ---------------------------------------------------------------------


@pytest.fixture
async def s3world(db_url: str, tmp_path: Path, moto_server: Any) -> AsyncIterator[World]:
    from trace_aws.s3_store import S3ObjectStore

    name = f"tq-{os.getpid()}-{tmp_path.name[-12:].lower().replace('_', '-')}"
    S3ObjectStore.create_bucket(name, endpoint_url=moto_server.url)
    store = S3ObjectStore(name, endpoint_url=moto_server.url)
    pool = await open_pool(db_url, min_size=2, max_size=8)
    d = Dispatcher(
        pool,
        signer=MemorySigner(),
        queue=MemoryQueue("tasks"),
        object_store=store,
        retry=RetryPolicy(max_attempts=3, base_s=0.0),
        rand=lambda: 0.5,
    )
    ds = Datasets(pool, object_store=store)
    q = QueryService(ds, None, limits=Limits(deadline_s=30.0), s3=S3Access.of_store(store))
    w = World(d, ds, store, q, db_url, tmp_path)  # type: ignore[arg-type]
    await ds.ensure_dag(ORG, DAG, deployers=["dave"])
    await ds.ensure_dag(OTHER, "other")
    await ds.set_member(None, ORG, "ann", ["analyst"])
    await ds.set_member(None, ORG, "alice", ["admin"])
    await ds.set_member(None, ORG, "dave", [])
    await ds.set_member(None, ORG, "bob", [])
    await ds.register(ORG, "shared", dag=DAG, job="j", read_roles=["analyst"])
    await ds.register(ORG, "private", dag=DAG, job="j", read_roles=[])
    await ds.cutover(None, ORG, DAG, await publish(w, ORG, DAG, {"shared": "v1", "private": "p"}))
    await ds.register(OTHER, "shared", dag="other", job="j", read_roles=["analyst"])
    await ds.cutover(None, OTHER, "other", await publish(w, OTHER, "other", {"shared": SECRET}))
    try:
        yield w
    finally:
        await pool.close()


async def test_service_over_s3_pins_one_version_across_a_cutover(s3world: World) -> None:
    w = s3world
    ann = await w.ds.user_caller(ORG, "ann")
    r = await w.q.query(ann, ORG, "SELECT tag, count(*) FROM shared GROUP BY tag")
    assert r.rows == [["v1", 5]]
    # another org's same-named dataset and an ungranted one: one message, nothing leaked
    for sql in ("SELECT * FROM private", "SELECT * FROM nope"):
        with pytest.raises(errors.NotFound) as info:
            await w.q.query(ann, ORG, sql)
        assert info.value.message == "dataset not found or not readable"
    # a cutover after the query pinned, before the sandbox reads S3: one pinned version only
    q = CutoverMidQuery(w.ds, None, limits=Limits(deadline_s=30.0), s3=w.q._s3)
    q.world = w
    sql = "SELECT p.tag AS a, s.tag AS b, count(*) AS n FROM private p JOIN shared s USING (n) GROUP BY ALL"
    r = await q.query(await w.ds.user_caller(ORG, "alice"), ORG, sql)
    assert r.rows == [["p", "v1", 5]]  # never v2, never a mix
    assert set(q.moved.values()).isdisjoint(r.versions.values())
    r = await w.q.query(ann, ORG, "SELECT DISTINCT tag FROM shared")
    assert r.rows == [["v2"]]
    assert SECRET not in str(r.rows)


@pytest.mark.parametrize("principal", list(READABLE))
async def test_permission_matrix_through_the_query_path_over_s3(
    s3world: World, principal: str
) -> None:
    """The datasets permission matrix (users and task callers) through the Query Service with
    the datasets' Parquet on S3, as test_query_service runs it over local files."""
    w = s3world
    caller = await _caller(w, principal)
    for dataset in ("private", "shared"):
        sql = f"SELECT count(*) FROM {dataset}"
        if dataset in READABLE[principal]:
            assert (await w.q.query(caller, ORG, sql)).rows == [[5]]
        else:
            with pytest.raises(errors.NotFound) as info:
                await w.q.query(caller, ORG, sql)
            assert (info.value.message, info.value.field) == (
                "dataset not found or not readable",
                "sql",
            )
    if READABLE[principal] != {"private", "shared"}:
        with pytest.raises(errors.NotFound, match=r"^dataset not found or not readable$"):
            await w.q.query(caller, ORG, "SELECT * FROM shared, private")
    # another org's same-named dataset never answers, whatever the caller may read here
    r = await w.q.query(
        await w.ds.user_caller(ORG, "alice"), ORG, "SELECT DISTINCT tag FROM shared"
    )
    assert SECRET not in str(r.rows)


async def test_stream_and_export_over_s3(s3world: World) -> None:
    w = s3world
    ann = await w.ds.user_caller(ORG, "ann")
    async with w.q.open_stream(ann, ORG, "SELECT n, tag FROM shared ORDER BY n") as s:
        schema = pa.ipc.read_schema(pa.py_buffer(s.schema))
        rows = [
            r
            async for b in s.batches()
            for r in pa.ipc.read_record_batch(pa.py_buffer(b), schema).to_pylist()
        ]
    assert rows == [{"n": i, "tag": "v1"} for i in range(5)]
    exports = QueryExports(w.q, w.ds, w.store)  # type: ignore[arg-type]
    status = await exports.start(ann, ORG, "SELECT n FROM shared WHERE n > 2", fmt="parquet")
    await exports.wait(status.export_id)
    status = await exports.status("ann", status.export_id)
    assert (status.state, status.rows) == ("succeeded", 2), status
    org_id = await w.ds.org_id(ORG)
    key = f"org/{org_id}/results/{status.export_id}.parquet"
    table = pq.read_table(io.BytesIO(await w.store.get(key)))
    assert table.column("n").to_pylist() == [3, 4]
    assert status.url is not None and status.url.startswith("http")


async def test_the_aws_profiles_app_mounts_the_query_service_over_s3(s3world: World) -> None:
    """``make_app`` with the AWS profile's S3 store: ``/v1/query`` answers (it was 503)."""
    from aiohttp.test_utils import TestClient, TestServer

    from trace_lite.users import LocalUserIssuer, UserAuthenticator
    from trace_servers.app import make_app

    issuer = LocalUserIssuer.init(s3world.tmp / "keys")
    auth = UserAuthenticator({issuer.key.kid: issuer.key})
    app = make_app(s3world.d, platform_token="p" * 32, user_auth=auth)
    async with TestClient(TestServer(app)) as c:
        r = await c.post(
            "/v1/query",
            headers={"Authorization": f"Bearer {issuer.token('ann')}"},
            json={"org": ORG, "sql": "SELECT count(*) AS n, max(tag) AS t FROM shared"},
        )
        assert r.status == 200, await r.text()
        assert (await r.json())["rows"] == [[5, "v1"]]
