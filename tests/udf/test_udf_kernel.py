"""``trace_core.udf`` (manifest, references, responses, failures) and the Python SDK's local
harness and batching, without processes."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

from trace_core import errors, udf, wire
from trace_udf import Context, NonRetryableError
from trace_udf._context import MAX_BATCH_BYTES, MAX_BATCH_ROWS, chunk_rows, token_grants
from trace_udf.testing import run

FENCE = wire.FenceFields("6f1c8a52-34c8-4f26-9f55-5d1e4b0a2c11", 2, str(uuid.UUID(int=7)))


def _manifest(**over: Any) -> bytes:
    doc: dict[str, Any] = {"format": 1, "name": "blocks", "language": "python", "handler": "h.f"}
    doc.update(over)
    return json.dumps({k: v for k, v in doc.items() if v is not None}).encode()


def test_a_manifest_with_defaults() -> None:
    m = udf.parse_manifest(_manifest())
    assert (m.name, m.language, m.handler, m.entry) == ("blocks", udf.Language.PYTHON, "h.f", "")
    assert m.limits == udf.Limits(256, None)
    assert udf.parse_manifest(json.dumps(m.to_json()).encode()) == m
    node = udf.parse_manifest(_manifest(language="node", handler="index.handler"))
    assert node.entry == "runtime.mjs"
    rust = udf.parse_manifest(_manifest(language="rust", handler="x"))
    assert rust.entry == "bootstrap"


@pytest.mark.parametrize(
    ("over", "field"),
    [
        ({"format": 2}, "format"),
        ({"name": "Blocks"}, "name"),
        ({"language": "ruby"}, "language"),
        ({"handler": "nodot"}, "handler"),
        ({"handler": None}, "handler"),
        ({"entry": "../escape", "language": "node", "handler": "a.b"}, "entry"),
        ({"entry": "/abs", "language": "rust", "handler": "a"}, "entry"),
        ({"limits": {"memory_mb": 8}}, "limits.memory_mb"),
        ({"limits": {"memory_mb": True}}, "limits.memory_mb"),
        ({"limits": {"timeout_s": 901}}, "limits.timeout_s"),
        ({"limits": {"cpu": 1}}, "limits.cpu"),
        ({"extra": 1}, "extra"),
    ],
)
def test_a_bad_manifest_names_its_field(over: dict[str, Any], field: str) -> None:
    with pytest.raises(errors.ValidationFailed) as exc:
        udf.parse_manifest(_manifest(**over))
    assert exc.value.field == field


def test_not_json_is_refused() -> None:
    with pytest.raises(errors.ValidationFailed):
        udf.parse_manifest(b"\xff")


@pytest.mark.parametrize(
    ("value", "field"),
    [
        ("blocks", "bundle"),
        ({"name": "blocks"}, "bundle.digest"),
        ({"name": "blocks", "digest": "sha256:" + "A" * 64}, "bundle.digest"),
        ({"name": "../x", "digest": "sha256:" + "a" * 64}, "bundle.name"),
        ({"name": "b", "digest": "sha256:" + "a" * 64, "x": 1}, "bundle"),
    ],
)
def test_a_bad_reference_names_its_field(value: object, field: str) -> None:
    with pytest.raises(errors.ValidationFailed) as exc:
        udf.parse_ref(value)
    assert exc.value.field == field


def _task(payload: dict[str, Any]) -> wire.TaskPayload:
    return wire.TaskPayload(
        task_id=FENCE.task_id,
        org_id="0b6a4a4e-8f0e-4f5e-9a43-1c2d3e4f5a6b",
        job_id=None,
        operator="udf",
        payload=payload,
        status="running",
        attempt=2,
        max_attempts=3,
        timeout_s=30,
        staging_prefix="org/x/staging/task/y/attempt/2/",
    )


def test_the_bundle_key_comes_from_name_and_digest() -> None:
    digest = "sha256:" + "ab" * 32
    task = _task({"bundle": {"name": "blocks", "digest": digest}})
    assert udf.bundle_key(task) == f"org/{task.org_id}/bundles/blocks/sha256-{'ab' * 32}.zip"
    assert udf.bundle_key(_task({"bundle_key": "org/x/b.zip"})) == "org/x/b.zip"
    assert udf.bundle_key(_task({})) == f"org/{task.org_id}/bundles/udf/bundle.zip"


def test_the_invoke_payload_is_the_task_plus_the_claim() -> None:
    task = _task({"n": 1})
    claim = wire.ClaimResponse(
        task_id=task.task_id,
        attempt=2,
        lease_token=FENCE.lease_token,
        lease_expires_at="2026-01-01T00:00:00+00:00",
        capability_token="tok",
        heartbeat_interval_s=15.0,
    )
    p = udf.invoke_payload(task, claim, "http://x/o/b")
    assert wire.unstructure(p) == {
        **wire.unstructure(task),
        "capability_token": "tok",
        "lease_token": FENCE.lease_token,
        "lease_expires_at": "2026-01-01T00:00:00+00:00",
        "bundle_url": "http://x/o/b",
    }


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b"garbage\x00", "$"),
        (b"[1]", "$"),
        (b'{"result": [1]}', "result"),
        (b'{"rows": 1}', "rows"),
        (b'{"final_events": [{"key": "bad key", "type": "t"}]}', "final_events[0].key"),
        (b'{"result": {"x": NaN}}', "response.result.x"),
    ],
)
def test_a_bad_response_is_refused_with_its_field(body: bytes, field: str) -> None:
    with pytest.raises(errors.ValidationFailed) as exc:
        udf.parse_response(body, FENCE)
    assert exc.value.field == field


def test_a_good_response_is_a_completion() -> None:
    req = udf.parse_response(
        b'{"result": {"n": 1}, "final_events": [{"key": "k", "type": "t"}]}', FENCE
    )
    assert (req.outcome, req.result, req.attempt) == ("succeeded", {"n": 1}, 2)
    assert udf.parse_response(b"{}", FENCE).result is None


@pytest.mark.parametrize(
    ("body", "code", "retryable"),
    [
        (b'{"errorType": "ValueError", "errorMessage": "x"}', "udf_error", True),
        (b'{"errorType": "NonRetryableError", "errorMessage": "x"}', "udf_error", False),
        (b'{"errorType": "MemoryError", "errorMessage": ""}', "udf_out_of_memory", True),
        (b"not json", "udf_error", True),
    ],
)
def test_handler_failures(body: bytes, code: str, retryable: bool) -> None:
    f = udf.handler_failure(body)
    assert (f.code.value, f.retryable) == (code, retryable)
    assert f.outcome()["error"]["code"] == code


def test_rows_are_chunked_by_count_and_bytes() -> None:
    rows = [{"i": i} for i in range(2500)]
    assert [len(c) for c in chunk_rows(rows)] == [MAX_BATCH_ROWS, MAX_BATCH_ROWS, 500]
    big = [{"s": "x" * 100_000} for _ in range(5)]
    chunks = chunk_rows(big)
    assert [len(c) for c in chunks] == [2, 2, 1]
    assert all(sum(len(json.dumps(r)) + 1 for r in c) <= MAX_BATCH_BYTES for c in chunks)
    with pytest.raises(ValueError):
        chunk_rows([{"s": "x" * MAX_BATCH_BYTES}])


def test_token_grants_are_read_from_the_token() -> None:
    import base64

    claims = {"grants": {"datasets": {"read": ["blocks", "logs"]}}}
    part = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
    assert token_grants(f"h.{part}.s") == ["blocks", "logs"]
    assert token_grants("garbage") == []


def test_the_local_harness_runs_a_handler_against_tables() -> None:
    def handler(ctx: Context) -> dict[str, Any]:
        rows = ctx.query("SELECT number, gas FROM blocks WHERE gas > 10 ORDER BY number")
        ctx.emit_rows("heavy", rows)
        ctx.emit_rows("heavy", rows[:1], key="first")
        ctx.emit_event("heavy.done", {"n": len(rows)}, key="done")
        return {"datasets": ctx.datasets, "threshold": ctx.payload["threshold"]}

    blocks = [{"number": 1, "gas": 5}, {"number": 2, "gas": 50}, {"number": 3, "gas": 70}]
    out = run(handler, {"threshold": 10}, datasets={"blocks": blocks})
    assert out.result == {"datasets": ["blocks"], "threshold": 10}
    heavy = [{"number": 2, "gas": 50}, {"number": 3, "gas": 70}]
    assert out.rows == {"heavy": [*heavy, heavy[0]]}
    assert out.batch_keys == {"heavy": ["heavy.0.0", "first.0"]}
    assert out.final_events == [{"key": "done", "type": "heavy.done", "payload": {"n": 2}}]


def test_the_local_harness_checks_the_return_value_and_raises() -> None:
    with pytest.raises(TypeError, match="dict or None"):
        run(lambda ctx: [1])
    with pytest.raises(NonRetryableError):
        run(lambda ctx: (_ for _ in ()).throw(NonRetryableError("no")))

    async def coro(ctx: Context) -> dict[str, Any]:
        return {"async": True}

    assert run(coro).result == {"async": True}


def test_emit_rows_refuses_a_bad_key_and_a_reused_one() -> None:
    def handler(ctx: Context) -> None:
        ctx.emit_rows("d", [{"a": 1}], key="k")
        with pytest.raises(ValueError, match="already used"):
            ctx.emit_rows("d", [{"a": 2}], key="k")
        with pytest.raises(ValueError, match="must match"):
            ctx.emit_rows("d", [{"a": 2}], key="bad key")
        with pytest.raises(TypeError):
            ctx.emit_rows("d", [{"a": object()}])

    run(handler)
