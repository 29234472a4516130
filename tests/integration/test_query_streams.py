# ruff: noqa: F811  (the fixtures world and api come from test_query_service)
"""Streamed answers of the Query Service (Arrow IPC stream, NDJSON) over HTTP and in process:
beyond the interactive 10,000-row cap, with the stream row limit still enforced."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pyarrow as pa
import pytest
from test_query_service import ORG, World, api, world  # noqa: F401  (fixtures)

from trace_core import errors
from trace_lite.query import Limits, QueryService, run_sandboxed
from trace_lite.users import LocalUserIssuer

ARROW = "application/vnd.apache.arrow.stream"
NDJSON = "application/x-ndjson"
BIG = 25_000  # over the interactive cap (the fixture's service: 100; make_app's: 10,000)


def _headers(issuer: LocalUserIssuer, accept: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {issuer.token('ann')}", "Accept": accept}


async def test_arrow_stream_answer(world: World, api: Any) -> None:
    c, issuer = api
    sql = f"SELECT s.n, s.tag, r.range AS i FROM shared s, (SELECT unnest(range({BIG // 5})) AS range) r"
    r = await c.post("/v1/query", headers=_headers(issuer, ARROW), json={"org": ORG, "sql": sql})
    assert r.status == 200, await r.text()
    assert r.content_type == ARROW
    assert json.loads(r.headers["X-Trace-Versions"]).keys() == {"shared"}
    table = pa.ipc.open_stream(await r.read()).read_all()
    assert table.num_rows == BIG  # more than the interactive cap of 10,000
    assert table.column_names == ["n", "tag", "i"]
    assert set(table.column("tag").to_pylist()) == {"v1"}
    # the row limit holds: max_rows, capped by the stream limit
    r = await c.post(
        "/v1/query",
        headers=_headers(issuer, ARROW),
        json={"org": ORG, "sql": sql, "max_rows": 7},
    )
    assert pa.ipc.open_stream(await r.read()).read_all().num_rows == 7
    assert r.headers["X-Trace-Row-Limit"] == "7"
    # refusals before the first byte are ordinary error answers
    for bad, status in (("SELECT * FROM private", 404), ("SELECT version()", 422)):
        r = await c.post(
            "/v1/query", headers=_headers(issuer, ARROW), json={"org": ORG, "sql": bad}
        )
        assert r.status == status and (await r.json())["field"] == "sql"
    assert world.sql("SELECT count(*) FROM dataset_pins")[0][0] == 0


async def test_ndjson_stream_answer(world: World, api: Any) -> None:
    c, issuer = api
    sql = f"SELECT r.range AS i, s.tag FROM shared s, (SELECT unnest(range({BIG // 5})) AS range) r ORDER BY i"
    r = await c.post(
        "/v1/query",
        headers=_headers(issuer, NDJSON),
        json={"org": ORG, "sql": sql, "max_rows": BIG - 1},
    )
    assert r.status == 200 and r.content_type == NDJSON
    lines = [json.loads(x) for x in (await r.text()).splitlines()]
    head, rows, end = lines[0], lines[1:-1], lines[-1]
    assert head["columns"] == [{"name": "i", "type": "BIGINT"}, {"name": "tag", "type": "VARCHAR"}]
    assert list(head["versions"]) == ["shared"]
    assert len(rows) == BIG - 1 and rows[0] == [0, "v1"]
    assert end == {"rows": BIG - 1, "truncated": True}
    r = await c.post(
        "/v1/query",
        headers=_headers(issuer, NDJSON),
        json={"org": ORG, "sql": "SELECT n FROM shared ORDER BY n"},
    )
    lines = [json.loads(x) for x in (await r.text()).splitlines()]
    assert lines[1:] == [[0], [1], [2], [3], [4], {"rows": 5, "truncated": False}]


async def test_a_failure_midway_ends_the_ndjson_stream_with_an_error_line(
    world: World, api: Any
) -> None:
    c, issuer = api
    # the cast fails on a row far after the first batches were sent
    sql = (
        "SELECT (CASE WHEN range < 900000 THEN '1' ELSE 'x' END)::INTEGER AS v "
        "FROM (SELECT unnest(range(1000000)) AS range)"
    )
    r = await c.post("/v1/query", headers=_headers(issuer, NDJSON), json={"org": ORG, "sql": sql})
    assert r.status == 200
    lines = [json.loads(x) for x in (await r.text()).splitlines()]
    assert len(lines) > 2
    assert lines[-1]["error"] == "validation_failed" and "rows" not in lines[-1]
    assert "Could not convert string 'x'" in lines[-1]["message"]
    # an Arrow answer is aborted: no end-of-stream marker, the client sees a broken stream
    r = await c.post("/v1/query", headers=_headers(issuer, ARROW), json={"org": ORG, "sql": sql})
    assert r.status == 200
    with pytest.raises(aiohttp.ClientPayloadError):
        await r.read()


async def test_the_stream_limit_caps_rows_and_bytes(world: World) -> None:
    q = QueryService(
        world.ds,
        world.store,
        stream_limits=Limits(deadline_s=20.0, max_rows=1_000, max_bytes=10**9),
    )
    ann = await world.ds.user_caller(ORG, "ann")
    async with q.open_stream(ann, ORG, "SELECT unnest(range(5000))", max_rows=10**6) as s:
        n = sum(
            [
                pa.ipc.read_record_batch(
                    pa.py_buffer(b), pa.ipc.read_schema(pa.py_buffer(s.schema))
                ).num_rows
                async for b in s.batches()
            ]
        )
    assert (n, s.rows, s.truncated) == (1_000, 1_000, True)
    small = QueryService(
        world.ds, world.store, stream_limits=Limits(deadline_s=20.0, max_bytes=50_000)
    )
    with pytest.raises(errors.PayloadTooLarge):
        async with small.open_stream(ann, ORG, "SELECT unnest(range(100000))") as s:
            async for _ in s.batches():
                pass


async def test_the_stream_deadline_kills_the_sandbox(world: World) -> None:
    q = QueryService(world.ds, world.store, stream_limits=Limits(deadline_s=3.0, max_rows=10**7))
    ann = await world.ds.user_caller(ORG, "ann")
    with pytest.raises(errors.ValidationFailed, match="time limit"):
        # more than a pipe holds: the sandbox waits on its reader, which waits past the deadline
        async with q.open_stream(ann, ORG, "SELECT unnest(range(2000000))") as s:
            await asyncio.sleep(5)
            async for _ in s.batches():
                pass
    assert world.sql("SELECT count(*) FROM dataset_pins")[0][0] == 0


async def test_a_slow_querys_answer_is_not_corrupted_by_a_progress_bar() -> None:
    """DuckDB draws a progress bar on stdout once a query runs over 2 s; stdout is the
    sandbox's answer, so the sandbox turns it off (without that, this answer was unreadable
    and reported as a resource limit)."""
    sql = "SELECT count(*) FROM (SELECT unnest(range(6000)) a), (SELECT unnest(range(3000000)) b)"
    result = await run_sandboxed(sql, {}, Limits(deadline_s=120.0))
    assert result.rows == [[18_000_000_000]]
