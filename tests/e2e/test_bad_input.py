"""Bad input on every POST route of a real Dispatcher process: the right status, a JSON error
body naming the field, and nothing written (row counts and the task row unchanged)."""

from __future__ import annotations

import hashlib
import http.client
import json
from collections.abc import Iterator
from typing import Any

import pytest
from e2e_harness import Response, TraceProcs

MIB = 1024 * 1024
#: /internal/admin/tasks mirrors Lambda's synchronous payload limit, 6 MB
#: (docs/standards/operations.md, row "API body limit").
ADMIN_LIMIT = 6 * 1000 * 1000


class Env:
    def __init__(self, t: TraceProcs) -> None:
        self.t = t
        t.start_dispatcher()
        self.task_id = t.create_task("noop")
        self.spare_id = t.create_task("noop")
        self.org_id = str(t.scalar("SELECT org_id FROM tasks WHERE task_id = %s", (self.task_id,)))
        self.claim = t.claim(self.task_id)
        self.fence = {k: self.claim[k] for k in ("task_id", "attempt", "lease_token")}
        data = b'{"x":1}\n'
        self.batch = {
            "key": "b1",
            "dataset": "rows",
            "object_key": f"org/{self.org_id}/staging/task/{self.task_id}/attempt/1/b1.jsonl",
            "row_count": 1,
            "byte_size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        }

    def snapshot(self) -> tuple[Any, ...]:
        return (
            self.t.counts(),
            self.t.sql(
                "SELECT task_id::text, state, attempt, lease_token::text, "
                "lease_expires_at, result, updated_at FROM tasks ORDER BY task_id"
            ),
            self.t.sql(
                "SELECT task_id::text, attempt, outcome, lease_expires_at, heartbeat_at "
                "FROM task_attempts ORDER BY task_id, attempt"
            ),
        )

    def post(self, path: str, *, body: Any = None, raw: bytes | None = None) -> Response:
        if path.startswith("/v1/"):
            return self.t.request(
                "POST", path, body=body, raw=raw, capability=self.claim["capability_token"]
            )
        return self.t.request("POST", path, body=body, raw=raw, platform=True)


@pytest.fixture
def env(trace_procs: TraceProcs) -> Iterator[Env]:
    # a long lease: nothing but the requests under test may touch the task
    trace_procs.lease_s = 120.0
    e = Env(trace_procs)
    before = e.snapshot()
    yield e
    assert e.snapshot() == before, "a refused request wrote something"


ROUTES = [
    "/internal/task-claim",
    "/internal/admin/tasks",
    "/v1/task/heartbeat",
    "/v1/task/events",
    "/v1/task/buffer-publish",
    "/v1/task/complete",
]


def _check(r: Response, status: int, code: str, field: str | None = None) -> dict[str, Any]:
    assert r.status == status, r
    assert r.headers.get("Content-Type", "").startswith("application/json"), r
    body: dict[str, Any] = r.json
    assert body["error"] == code, r
    assert isinstance(body["message"], str) and body["message"], r
    if field is not None:
        assert body.get("field") == field, r
    return body


def _valid(env: Env, path: str) -> dict[str, Any]:
    f = env.fence
    return {
        "/internal/task-claim": {"task_id": env.spare_id, "worker_id": "w"},
        "/internal/admin/tasks": {"tasks": [{"operator": "noop"}]},
        "/v1/task/heartbeat": dict(f),
        "/v1/task/events": {**f, "events": [{"key": "k", "type": "progress"}]},
        "/v1/task/buffer-publish": {**f, "batch": dict(env.batch)},
        "/v1/task/complete": {**f, "result": {"ok": True}},
    }[path]


@pytest.mark.parametrize(
    "raw", [b"{not json", b"", b"\xff\xfe", b'{"task_id": ', b"[1, 2]", b'"a string"', b"null"]
)
def test_malformed_json_is_400_on_every_route(env: Env, raw: bytes) -> None:
    for path in ROUTES:
        _check(env.post(path, raw=raw), 400, "malformed_body")


def test_wrong_types_are_422_with_the_field_path(env: Env) -> None:
    f = env.fence
    cases: list[tuple[str, dict[str, Any], str]] = [
        ("/internal/task-claim", {"task_id": 123}, "task_id"),
        ("/internal/task-claim", {"task_id": "not-a-uuid"}, "task_id"),
        ("/internal/task-claim", {"task_id": env.spare_id, "worker_id": 7}, "worker_id"),
        ("/internal/task-claim", {}, "task_id"),
        ("/internal/admin/tasks", {"tasks": "noop"}, "tasks"),
        (
            "/internal/admin/tasks",
            {"tasks": [{"operator": "noop", "max_attempts": "3"}]},
            "tasks[0].max_attempts",
        ),
        (
            "/internal/admin/tasks",
            {"tasks": [{"operator": "noop"}, {"operator": "noop", "payload": [1]}]},
            "tasks[1].payload",
        ),
        (
            "/internal/admin/tasks",
            {"tasks": [{"operator": "noop", "max_attempts": 0}]},
            "tasks[0].max_attempts",
        ),
        ("/internal/admin/tasks", {"tasks": []}, "tasks"),
        ("/internal/admin/tasks", {"operator": "Bad Name!"}, "operator"),
        ("/v1/task/heartbeat", {**f, "attempt": "1"}, "attempt"),
        ("/v1/task/heartbeat", {**f, "attempt": True}, "attempt"),
        ("/v1/task/heartbeat", {**f, "attempt": 1.5}, "attempt"),
        ("/v1/task/heartbeat", {**f, "lease_token": "nope"}, "lease_token"),
        ("/v1/task/heartbeat", {"task_id": f["task_id"], "attempt": 1}, "lease_token"),
        ("/v1/task/events", {**f, "events": {"key": "k"}}, "events"),
        ("/v1/task/events", {**f, "events": [{"key": 5, "type": "progress"}]}, "events[0].key"),
        (
            "/v1/task/events",
            {**f, "events": [{"key": "ok", "type": "p"}, {"key": "bad key!", "type": "p"}]},
            "events[1].key",
        ),
        (
            "/v1/task/events",
            {**f, "events": [{"key": "k", "type": "p", "payload": "x"}]},
            "events[0].payload",
        ),
        (
            "/v1/task/buffer-publish",
            {**f, "batch": {**env.batch, "row_count": "1"}},
            "batch.row_count",
        ),
        ("/v1/task/buffer-publish", {**f, "batch": {**env.batch, "sha256": "XYZ"}}, "batch.sha256"),
        ("/v1/task/buffer-publish", {**f, "batch": []}, "batch"),
        ("/v1/task/complete", {**f, "retryable": "yes"}, "retryable"),
        ("/v1/task/complete", {**f, "outcome": "great"}, "outcome"),
        (
            "/v1/task/complete",
            {**f, "final_events": [{"key": 5, "type": "done"}]},
            "final_events[0].key",
        ),
        ("/v1/task/complete", {**f, "result": [1, 2]}, "result"),
        ("/v1/task/credentials", {**f, "read_prefixes": ["org/"] * 101}, "read_prefixes"),
    ]
    for path, body, field in cases:
        _check(env.post(path, body=body), 422, "validation_failed", field)


def test_integers_beyond_their_columns_are_422_before_sql(env: Env) -> None:
    """Every integer field is bounded by its column type: nothing reaches SQL to come back as
    "integer out of range" (a 500, or a 422 carrying PostgreSQL's words)."""
    f = env.fence
    output = {
        "dataset": "rows",
        "object_key": env.batch["object_key"],
        "size": 1,
        "sha256": "0" * 64,
        "partition": {"start": 0, "end": 10},
    }
    cases: list[tuple[str, dict[str, Any], str]] = [
        ("/v1/task/heartbeat", {**f, "attempt": 2**31}, "attempt"),
        ("/v1/task/heartbeat", {**f, "attempt": 2**80}, "attempt"),
        (
            "/v1/task/buffer-publish",
            {**f, "batch": {**env.batch, "row_count": 2**31}},
            "batch.row_count",
        ),
        (
            "/v1/task/buffer-publish",
            {**f, "batch": {**env.batch, "byte_size": 2**63}},
            "batch.byte_size",
        ),
        ("/v1/task/complete", {**f, "outputs": [{**output, "size": 2**63}]}, "outputs[0].size"),
        (
            "/v1/task/complete",
            {**f, "outputs": [{**output, "partition": {"start": 2**63, "end": 2**64}}]},
            "outputs[0].partition.start",
        ),
        (
            "/internal/admin/tasks",
            {"tasks": [{"operator": "noop", "delay_s": 1e300}]},
            "tasks[0].delay_s",
        ),
        (
            "/internal/admin/tasks",
            {"tasks": [{"operator": "noop", "max_attempts": 2**70}]},
            "tasks[0].max_attempts",
        ),
    ]
    for path, body, field in cases:
        body_ = _check(env.post(path, body=body), 422, "validation_failed", field)
        assert "range" not in body_["message"] and "Error" not in body_["message"], body_
    for attempt in ("2147483648", "99999999999999999999", "-1", "%D9%A1"):
        r = env.t.request(
            "GET", f"/internal/task-fetch?task_id={env.task_id}&attempt={attempt}", platform=True
        )
        _check(r, 422, "validation_failed", "attempt")


def test_unknown_fields_are_422(env: Env) -> None:
    for path in ROUTES:
        body = {**_valid(env, path), "surprise": 1}
        _check(env.post(path, body=body), 422, "validation_failed")
    nested = [
        ("/internal/admin/tasks", {"tasks": [{"operator": "noop", "surprise": 1}]}),
        ("/v1/task/events", {**env.fence, "events": [{"key": "k", "type": "p", "x": 1}]}),
        ("/v1/task/buffer-publish", {**env.fence, "batch": {**env.batch, "x": 1}}),
        ("/v1/task/complete", {**env.fence, "final_events": [{"key": "k", "type": "p", "x": 1}]}),
    ]
    for path, body in nested:
        _check(env.post(path, body=body), 422, "validation_failed")


def _padded(valid: dict[str, Any], size: int) -> bytes:
    """A body of at least ``size`` bytes that is otherwise valid JSON for the route."""
    raw = json.dumps({**valid, "padding": ""}).encode()
    return raw.replace(b'"padding": ""', b'"padding": "' + b"x" * (size - len(raw) + 16) + b'"')


def test_oversized_bodies_are_413(env: Env) -> None:
    for path in ROUTES:
        limit = ADMIN_LIMIT if path == "/internal/admin/tasks" else MIB
        raw = _padded(_valid(env, path), limit + 1)
        assert len(raw) > limit
        _check(env.post(path, raw=raw), 413, "payload_too_large")
    # just under 1 MiB on a 1 MiB route is parsed (and then refused for the unknown field)
    raw = _padded(_valid(env, "/v1/task/heartbeat"), MIB - 200)
    assert len(raw) <= MIB
    _check(env.post("/v1/task/heartbeat", raw=raw), 422, "validation_failed")


def test_oversized_chunked_body_without_content_length_is_413(env: Env) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"task_id": "' + env.task_id.encode() + b'", "pad": "'
        for _ in range(20):
            yield b"x" * (64 * 1024)
        yield b'"}'

    conn = http.client.HTTPConnection("127.0.0.1", env.t.port, timeout=30)
    try:
        conn.request(
            "POST",
            "/v1/task/heartbeat",
            body=chunks(),
            encode_chunked=True,
            headers={
                "Content-Type": "application/json",
                "X-Trace-Task-Capability": env.claim["capability_token"],
            },
        )
        resp = conn.getresponse()
        r = Response(resp.status, resp.read(), dict(resp.getheaders()))
    except (BrokenPipeError, ConnectionResetError):
        pytest.fail("the server dropped the connection instead of answering 413")
    finally:
        conn.close()
    _check(r, 413, "payload_too_large")
