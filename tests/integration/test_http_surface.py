"""The Dispatcher's aiohttp app in-process on real Postgres: ops endpoints, logs, errors."""

from __future__ import annotations

import json
import logging
import sys
import types
from collections.abc import AsyncIterator

import attrs
import pytest
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage
from aiohttp.test_utils import TestClient, TestServer

from trace_core import errors
from trace_core.testing import MemoryObjectStore, MemoryQueue, MemorySigner
from trace_lite.dispatcher import Dispatcher, open_pool
from trace_servers import http, logs
from trace_servers.app import make_app

PLATFORM = "platform-token-for-tests-0123456789"
AUTH = {"Authorization": f"Bearer {PLATFORM}"}


@pytest.fixture
async def served(db_url: str) -> AsyncIterator[tuple[TestClient, Dispatcher]]:
    pool = await open_pool(db_url, min_size=1, max_size=4)
    d = Dispatcher(
        pool, signer=MemorySigner(), queue=MemoryQueue("tasks"), object_store=MemoryObjectStore()
    )
    async with TestClient(TestServer(make_app(d, platform_token=PLATFORM))) as c:
        yield c, d
    await pool.close()


@pytest.fixture
def client(served: tuple[TestClient, Dispatcher]) -> TestClient:
    return served[0]


async def test_health_ready_and_metrics(client: TestClient) -> None:
    assert (await client.get("/healthz")).status == 200
    assert (await (await client.get("/readyz")).json()) == {"status": "ready"}
    r = await client.post(
        "/internal/admin/tasks", json={"tasks": [{"operator": "noop"}] * 3}, headers=AUTH
    )
    assert r.status == 201
    text = await (await client.get("/metrics")).text()
    assert 'trace_tasks{state="queued"} 3.0' in text
    assert 'trace_http_requests_total{route="/internal/admin/tasks",status="201"} 1.0' in text
    assert "trace_http_request_seconds_bucket" in text


async def test_full_lifecycle_over_http(client: TestClient) -> None:
    r = await client.post("/internal/admin/tasks", json={"operator": "noop"}, headers=AUTH)
    task_id = (await r.json())["task_id"]
    claim = await (
        await client.post("/internal/task-claim", json={"task_id": task_id}, headers=AUTH)
    ).json()
    cap = {"X-Trace-Task-Capability": claim["capability_token"]}
    fence = {k: claim[k] for k in ("task_id", "attempt", "lease_token")}
    fetched = await (
        await client.get(
            "/internal/task-fetch", params={"task_id": task_id, "attempt": "1"}, headers=AUTH
        )
    ).json()
    assert fetched["status"] == "running" and fetched["staging_prefix"].endswith("/attempt/1/")
    hb = await client.post("/v1/task/heartbeat", json=fence, headers=cap)
    assert hb.status == 200 and (await hb.json())["capability_token"]
    ev = await client.post(
        "/v1/task/events",
        headers=cap,
        json={**fence, "events": [{"key": "e1", "type": "progress", "payload": {}}]},
    )
    assert (await ev.json()) == {"accepted": 1, "duplicates": 0}
    body = {**fence, "result": {"ok": True}, "final_events": [{"key": "done", "type": "done"}]}
    done = await client.post("/v1/task/complete", json=body, headers=cap)
    assert (await done.json()) == {
        "task_id": task_id,
        "attempt": 1,
        "state": "completed",
        "replay": False,
    }
    again = await client.post("/v1/task/complete", json=body, headers=cap)
    assert (await again.json())["replay"] is True
    other = await client.post(
        "/v1/task/complete", json={**body, "result": {"ok": False}}, headers=cap
    )
    assert other.status == 409 and (await other.json())["error"] == "idempotency_mismatch"
    task = await (await client.get(f"/internal/admin/tasks/{task_id}", headers=AUTH)).json()
    assert [e["event_key"] for e in task["events"]] == ["e1", "done"]


async def test_not_found_and_bad_query(client: TestClient) -> None:
    r = await client.get("/internal/task-fetch", params={"task_id": "nope"}, headers=AUTH)
    assert r.status == 422 and (await r.json())["field"] == "task_id"
    r = await client.get(
        "/internal/task-fetch",
        params={"task_id": "00000000-0000-4000-8000-000000000000"},
        headers=AUTH,
    )
    assert r.status == 404 and (await r.json())["error"] == "not_found"
    r = await client.get(
        "/internal/task-fetch",
        params={"task_id": "00000000-0000-4000-8000-000000000000", "attempt": "0"},
        headers=AUTH,
    )
    assert r.status == 422 and (await r.json())["field"] == "attempt"


def test_json_log_lines_carry_task_and_attempt() -> None:
    formatter = logs.JsonFormatter("dispatcher")
    logs.bind(task_id="t-1", attempt=2)
    try:
        record = logging.LogRecord("trace.x", logging.INFO, __file__, 1, "hello", (), None)
        record.extra_field = "v"
        line = json.loads(formatter.format(record))
    finally:
        logs.clear()
    assert line["task_id"] == "t-1" and line["attempt"] == 2
    assert line["component"] == "dispatcher" and line["msg"] == "hello"
    assert line["extra_field"] == "v"


async def test_complete_batch_authorises_and_fences_each_item(client: TestClient) -> None:
    r = await client.post(
        "/internal/admin/tasks", json={"tasks": [{"operator": "noop"}] * 3}, headers=AUTH
    )
    ids = [t["task_id"] for t in (await r.json())["tasks"]]
    batch = await (
        await client.post("/internal/task-claim", json={"task_ids": ids}, headers=AUTH)
    ).json()
    grants = {g["claim"]["task_id"]: g["claim"] for g in batch["claims"]}
    a, b, c = (grants[i] for i in ids)

    def item(claim: dict, token: str | None = None, **extra: object) -> dict:
        fence = {k: claim[k] for k in ("task_id", "attempt", "lease_token")}
        return {
            "capability_token": token or claim["capability_token"],
            "completion": {**fence, **extra},
        }

    stale_b = item(b)
    stale_b["completion"]["lease_token"] = "00000000-0000-4000-8000-000000000000"
    body = {
        "completions": [
            item(a, result={"n": 1}),
            item(b, token=a["capability_token"]),
            stale_b,
            item(c, outcome="failed", error={"m": "x"}),
        ]
    }
    assert (await client.post("/internal/task-complete-batch", json=body)).status == 401
    r = await client.post("/internal/task-complete-batch", json=body, headers=AUTH)
    assert r.status == 200
    results = (await r.json())["results"]
    assert [(x["task_id"], x["state"], x["error"]) for x in results] == [
        (a["task_id"], "completed", None),
        (b["task_id"], None, "forbidden"),
        (b["task_id"], None, "lease_lost"),
        (c["task_id"], "pending", None),
    ]
    again = await client.post(
        "/internal/task-complete-batch",
        headers=AUTH,
        json={"completions": [item(a, result={"n": 1})]},
    )
    assert (await again.json())["results"][0]["replay"] is True
    task = await (await client.get(f"/internal/admin/tasks/{b['task_id']}", headers=AUTH)).json()
    assert task["state"] == "running"  # neither refused item wrote anything
    bad = await client.post(
        "/internal/task-complete-batch", headers=AUTH, json={"completions": [{"completion": {}}]}
    )
    assert bad.status == 422


async def _app_over(dispatcher: object, extra: list[web.RouteDef] | None = None) -> TestClient:
    app = make_app(dispatcher, platform_token=PLATFORM, extra_routes=extra)  # type: ignore[arg-type]
    return TestClient(TestServer(app))


async def test_server_failures_answer_without_backend_text() -> None:
    """A 5xx body holds the error class's fixed message: driver text and exception names are
    logged, never sent."""
    leaky = "database unavailable: OperationalError: connection to 10.0.0.7 failed: FATAL"

    async def unavailable() -> dict[str, int]:
        raise errors.Unavailable(leaky)

    async def broken() -> dict[str, int]:
        raise RuntimeError('psycopg.errors.NumericValueOutOfRange: bigint out of range "x"')

    for counts, status, code in ((unavailable, 503, "unavailable"), (broken, 500, "internal")):
        fake = types.SimpleNamespace(pool=None, object_store=None, counts=counts, wake_mode="queue")
        async with await _app_over(fake) as c:
            r = await c.get("/internal/admin/counts", headers=AUTH)
            body = await r.json()
        assert r.status == status and body["error"] == code, body
        text = json.dumps(body)
        assert "Error" not in text and "psycopg" not in text and "10.0.0.7" not in text, body


async def test_a_route_that_reads_before_it_authenticates_fails_closed() -> None:
    """``read_json`` refuses a request nothing authenticated: such a route is a server bug and
    answers 500 without parsing the body."""

    async def careless(request: web.Request) -> web.Response:
        return web.json_response(await http.read_json(request))

    fake = types.SimpleNamespace(pool=None, object_store=None, wake_mode="queue")
    async with await _app_over(fake, [web.post("/careless", careless)]) as c:
        r = await c.post("/careless", json={"a": 1})
        assert r.status == 500 and (await r.json())["error"] == "internal"


async def test_responses_name_no_server_version(client: TestClient) -> None:
    for r in (
        await client.get("/healthz"),
        await client.get("/nope"),
        await client.post("/internal/task-claim", json={}),
    ):
        assert r.headers["Server"] == "trace", r.headers


def test_malformed_http_is_logged_as_the_clients_mistake() -> None:
    """aiohttp's parser refusals (before any handler) are info lines without a traceback; other
    exceptions keep their level and traceback."""

    def record(exc: BaseException) -> logging.LogRecord:
        try:
            raise exc
        except BaseException:
            info = sys.exc_info()
        return logging.LogRecord(
            "aiohttp.server", logging.ERROR, __file__, 1, "Error handling request", (), info
        )

    bad = record(BadHttpMessage("Invalid character in Content-Length"))
    assert logs.ClientHttpErrors().filter(bad)
    line = json.loads(logs.JsonFormatter("dispatcher").format(bad))
    assert line["level"] == "info" and "exc" not in line and line["status"] == 400, line
    other = record(RuntimeError("boom"))
    assert logs.ClientHttpErrors().filter(other)
    line = json.loads(logs.JsonFormatter("dispatcher").format(other))
    assert line["level"] == "error" and "RuntimeError" in line["exc"], line


async def test_task_routes_check_every_token_claim_against_the_task(
    served: tuple[TestClient, Dispatcher],
) -> None:
    """A validly signed token whose org_id or sub does not match its task is refused (401) on
    every /v1/task/* route before anything runs (#8 item 10, the server side)."""
    c, d = served
    ids = []
    for org in ("org-a", "org-b"):
        r = await c.post(
            "/internal/admin/tasks", json={"operator": "noop", "org": org}, headers=AUTH
        )
        ids.append((await r.json())["task_id"])
    a, b = [
        await (await c.post("/internal/task-claim", json={"task_id": i}, headers=AUTH)).json()
        for i in ids
    ]
    good = await d.authorize(a["capability_token"], a["task_id"], 1)
    other_org = (await d.authorize(b["capability_token"], b["task_id"], 1)).org_id
    fence = {k: a[k] for k in ("task_id", "attempt", "lease_token")}
    bodies = {
        "/v1/task/heartbeat": fence,
        "/v1/task/events": {**fence, "events": [{"key": "k", "type": "progress"}]},
        "/v1/task/complete": {**fence, "result": {"ok": True}},
        "/v1/task/resolve": {**fence, "datasets": ["blocks"]},
        "/v1/task/credentials": fence,
    }
    for forged in (attrs.evolve(good, org_id=other_org), attrs.evolve(good, sub=b["task_id"])):
        token = await d.issuer.encode(forged)
        for path, body in bodies.items():
            r = await c.post(path, json=body, headers={"X-Trace-Task-Capability": token})
            assert r.status == 401, (path, await r.text())
    task = await (await c.get(f"/internal/admin/tasks/{a['task_id']}", headers=AUTH)).json()
    assert task["state"] == "running" and task["events"] == []
