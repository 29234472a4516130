"""The Node SDK's bootstrap against a Lambda Runtime API and a Dispatcher task surface on loopback.

Each test builds a TypeScript handler into a bundle with ``sdks/node/build.mjs`` (esbuild), starts
the bundle's ``bootstrap`` with a minimal environment (``AWS_LAMBDA_RUNTIME_API``,
``TRACE_DISPATCHER_URL``, ``PATH``), queues invoke events and checks what reached the Runtime API
(``/response`` or ``/error`` with its ``errorType``) and the task surface (which routes, which
token, which bodies).
"""

from __future__ import annotations

import asyncio
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from udf_lang_fakes import TaskApi, bootstrap, build_node_bundle, build_node_sdk, write_files

pytestmark = pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")

HANDLERS = {
    "ok": """
import type { Handler } from "@trace/udf";
export const handler: Handler = async (event, ctx) => {
  const n = Number(ctx.payload.n ?? 0);
  for (let i = 0; i < n; i++) ctx.emit("squares", { i, sq: i * i });
  ctx.emitEvent(`done-${event.attempt}`, "udf.done", { n });
  return { n, granted: [...ctx.grantedDatasets] };
};
""",
    "throws": """
export const handler = async () => { throw new TypeError("boom at row 3"); };
""",
    "nonretryable": """
import { NonRetryableError } from "@trace/udf";
export const handler = async () => { throw new NonRetryableError("input is malformed"); };
""",
    "wrong_shape": """
import type { JsonObject } from "@trace/udf";
export const handler = async (_e: unknown, ctx: { emit(d: string, r: JsonObject): void; payload: JsonObject }) => {
  ctx.emit("squares", { i: 1 });
  return ctx.payload.kind === "string" ? "not an object" : [1, 2, 3];
};
""",
    "garbage": """
export const handler = async () => {
  process.stdout.write(Buffer.from([0xff, 0xfe, 0x00, 0x1b, 0x5b, 0x32, 0x4a, 0x0a]));
  process.stdout.write("{not json at all\\n");
  process.stderr.write("\\u0000\\u0007 garbage on stderr\\n");
  console.log(JSON.stringify({ errorType: "Fake" }));
  return { fine: true };
};
""",
    "uncaught": """
export const handler = async (_e: unknown, ctx: { payload: { crash?: boolean } }) => {
  if (ctx.payload.crash) {
    setTimeout(() => { throw new RangeError("thrown from a timer"); }, 1);
    await new Promise(() => {});
  }
  return { survived: true };
};
""",
    "heartbeat": """
import type { Handler } from "@trace/udf";
export const handler: Handler = async (_e, ctx) => {
  await ctx.heartbeat();
  for (;;) {
    const seen = (await ctx.query("heartbeats")).rows[0]?.[0] as number;
    if (seen >= 2) break;
    await new Promise((r) => setTimeout(r, 50));
  }
  ctx.emit("squares", { i: 0 });
  return { beats: 2 };
};
""",
    "lease_lost": """
import type { Handler } from "@trace/udf";
export const handler: Handler = async (_e, ctx) => {
  await new Promise((resolve) => ctx.signal.addEventListener("abort", resolve));
  ctx.emit("squares", { i: 0 });
  return { stopped: ctx.signal.aborted };
};
""",
    "query": """
import type { Handler } from "@trace/udf";
export const handler: Handler = async (_e, ctx) => {
  const rows = await ctx.queryObjects("SELECT n FROM blocks", { maxRows: 10 });
  ctx.emit("copies", rows);
  return { read: rows.length };
};
""",
    "no_export": """
export const notTheHandler = () => ({});
""",
}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    build_node_sdk()
    root = tmp_path_factory.mktemp("node-bundles")
    out: dict[str, Path] = {}
    for name, source in HANDLERS.items():
        src = write_files(root / "src" / name, {"handler.ts": source})
        out[name] = build_node_bundle(src, root / "out" / name)
    return out


def command(bundle: Path) -> list[str]:
    return [str(bundle / "bootstrap")]


async def test_success_publishes_rows_then_completes_and_responds(bundles: dict[str, Path]) -> None:
    tasks = TaskApi()
    async with bootstrap(command(bundles["ok"]), tasks=tasks) as run:
        event = tasks.event({"n": 3})
        answer = await run.api.answer(run.api.queue(event))
    assert answer.kind == "response"
    assert answer.body["state"] == "completed"
    assert answer.body["rows"] == {"squares": 3}
    published = tasks.routes("buffer-publish")
    assert [p["batch"]["key"] for p in published] == ["rows:squares:0"]
    assert published[0]["batch"]["rows"] == [{"i": i, "sq": i * i} for i in range(3)]
    assert published[0]["task_id"] == event["task_id"]
    assert published[0]["lease_token"] == event["lease_token"]
    (complete,) = tasks.routes("complete")
    assert complete["outcome"] == "succeeded"
    assert complete["result"] == {"n": 3, "granted": []}
    assert complete["final_events"] == [{"key": "done-1", "type": "udf.done", "payload": {"n": 3}}]
    # Rows are published before the completion, and only with the attempt's token.
    assert [name for name, _, _ in tasks.calls] == ["buffer-publish", "complete"]
    assert tasks.tokens_used() == {event["capability_token"]}


async def test_serves_invocations_one_after_another(bundles: dict[str, Path]) -> None:
    tasks = TaskApi()
    async with bootstrap(command(bundles["ok"]), tasks=tasks) as run:
        first = await run.api.answer(run.api.queue(tasks.event({"n": 1})))
        second = await run.api.answer(run.api.queue(tasks.event({"n": 2})))
    assert (first.kind, second.kind) == ("response", "response")
    assert [c["result"]["n"] for c in tasks.routes("complete")] == [1, 2]


@pytest.mark.parametrize(
    ("bundle", "retryable", "message"),
    [("throws", True, "TypeError: boom at row 3"), ("nonretryable", False, "input is malformed")],
)
async def test_a_throwing_handler_fails_the_attempt_and_reports_error(
    bundles: dict[str, Path], bundle: str, retryable: bool, message: str
) -> None:
    tasks = TaskApi()
    async with bootstrap(command(bundles[bundle]), tasks=tasks) as run:
        answer = await run.api.answer(run.api.queue(tasks.event()))
    assert answer.kind == "error"
    assert answer.body["errorType"] == "Handler.Error"
    assert answer.error_type_header == "Handler.Error"
    assert message in answer.body["errorMessage"]
    assert answer.body["completed"] is True
    (complete,) = tasks.routes("complete")
    assert complete["outcome"] == "failed"
    assert complete["retryable"] is retryable
    assert complete["error"]["code"] == "handler_error"
    assert message in complete["error"]["message"]
    assert tasks.routes("buffer-publish") == []


@pytest.mark.parametrize(("kind", "named"), [("array", "an array"), ("string", "string")])
async def test_a_wrong_shape_result_is_invalid_result_and_nothing_is_published(
    bundles: dict[str, Path], kind: str, named: str
) -> None:
    tasks = TaskApi()
    async with bootstrap(command(bundles["wrong_shape"]), tasks=tasks) as run:
        answer = await run.api.answer(run.api.queue(tasks.event({"kind": kind})))
    assert answer.kind == "error"
    assert answer.body["errorType"] == "Runtime.InvalidResult"
    assert f"the handler returned {named}" in answer.body["errorMessage"]
    (complete,) = tasks.routes("complete")
    assert (complete["outcome"], complete["retryable"]) == ("failed", True)
    assert complete["error"]["code"] == "invalid_result"
    assert tasks.routes("buffer-publish") == []


async def test_garbage_on_stdout_and_stderr_does_not_disturb_the_protocol(
    bundles: dict[str, Path],
) -> None:
    tasks = TaskApi()
    async with bootstrap(command(bundles["garbage"]), tasks=tasks) as run:
        answer = await run.api.answer(run.api.queue(tasks.event()))
    assert answer.kind == "response"
    assert tasks.routes("complete")[0]["result"] == {"fine": True}
    assert b"{not json at all" in run.stdout


async def test_an_uncaught_exception_fails_that_invocation_and_the_runtime_serves_on(
    bundles: dict[str, Path],
) -> None:
    tasks = TaskApi()
    async with bootstrap(command(bundles["uncaught"]), tasks=tasks) as run:
        crashed = await run.api.answer(run.api.queue(tasks.event({"crash": True})))
        after = await run.api.answer(run.api.queue(tasks.event({"crash": False})))
    assert crashed.kind == "error"
    assert crashed.body["errorType"] == "Handler.Error"
    assert "RangeError: thrown from a timer" in crashed.body["errorMessage"]
    assert after.kind == "response"
    assert after.body["state"] == "completed"


async def test_heartbeats_renew_the_token_and_the_renewed_token_completes(
    bundles: dict[str, Path],
) -> None:
    tasks = TaskApi()
    async with bootstrap(command(bundles["heartbeat"]), tasks=tasks) as run:
        first_token = tasks.token
        # A 4 s lease: the runtime heartbeats every second on its own.
        event = tasks.event(lease_expires_at=_in_seconds(4))
        answer = await run.api.answer(run.api.queue(event))
    assert answer.kind == "response", answer.body
    beats = [c for c in tasks.calls if c[0] == "heartbeat"]
    assert len(beats) >= 2
    assert beats[0][2] == first_token
    # Every call after a heartbeat carries the token that heartbeat returned.
    (complete_call,) = [c for c in tasks.calls if c[0] == "complete"]
    assert complete_call[2] == tasks.token != first_token


async def test_a_refused_heartbeat_aborts_the_handler_and_nothing_completes(
    bundles: dict[str, Path],
) -> None:
    tasks = TaskApi()
    tasks.faults["heartbeat"] = [(409, {"error": "lease_lost", "message": "a newer attempt"})]
    async with bootstrap(command(bundles["lease_lost"]), tasks=tasks) as run:
        answer = await run.api.answer(run.api.queue(tasks.event(lease_expires_at=_in_seconds(4))))
    assert answer.kind == "error"
    assert answer.body["errorType"] == "Runtime.LeaseLost"
    assert "a newer attempt" in answer.body["errorMessage"]
    assert tasks.routes("complete") == []
    assert tasks.routes("buffer-publish") == []


async def test_transient_dispatcher_failures_are_retried(bundles: dict[str, Path]) -> None:
    tasks = TaskApi()
    unavailable = (503, {"error": "unavailable", "message": "database down"})
    tasks.faults["buffer-publish"] = [unavailable]
    tasks.faults["complete"] = [unavailable, unavailable]
    async with bootstrap(command(bundles["ok"]), tasks=tasks) as run:
        answer = await run.api.answer(run.api.queue(tasks.event({"n": 1})))
    assert answer.kind == "response"
    assert len(tasks.routes("buffer-publish")) == 2
    assert len(tasks.routes("complete")) == 3


async def test_a_refused_completion_is_a_dispatcher_error(bundles: dict[str, Path]) -> None:
    tasks = TaskApi()
    tasks.faults["complete"] = [(409, {"error": "conflict", "message": "attempt finished"})] * 2
    async with bootstrap(command(bundles["ok"]), tasks=tasks) as run:
        answer = await run.api.answer(run.api.queue(tasks.event({"n": 1})))
    assert answer.kind == "error"
    assert answer.body["errorType"] == "Runtime.DispatcherError"
    assert "attempt finished" in answer.body["errorMessage"]


async def test_query_reads_through_the_task_surface(bundles: dict[str, Path]) -> None:
    tasks = TaskApi()
    tasks.answers["SELECT n FROM blocks"] = {
        "columns": [{"name": "n", "type": "BIGINT"}],
        "rows": [[1], [2]],
        "truncated": False,
        "versions": {"blocks": "v1"},
    }
    async with bootstrap(command(bundles["query"]), tasks=tasks) as run:
        answer = await run.api.answer(run.api.queue(tasks.event()))
    assert answer.kind == "response"
    (query,) = tasks.routes("query")
    assert query == {"sql": "SELECT n FROM blocks", "format": "json", "max_rows": 10}
    assert tasks.routes("buffer-publish")[0]["batch"]["rows"] == [{"n": 1}, {"n": 2}]


async def test_a_refused_query_fails_the_handler(bundles: dict[str, Path]) -> None:
    tasks = TaskApi()  # no answer: the fake refuses with 404 like an ungranted dataset
    async with bootstrap(command(bundles["query"]), tasks=tasks) as run:
        answer = await run.api.answer(run.api.queue(tasks.event()))
    assert answer.kind == "error"
    assert "not_found: dataset not found or not readable" in answer.body["errorMessage"]


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b"\xff\xfe not json", "the event is not JSON"),
        (b"[1, 2]", "the event is not a JSON object"),
        (b'{"task_id": "t"}', "event.lease_token"),
    ],
)
async def test_an_invalid_event_is_reported_and_nothing_reaches_the_dispatcher(
    bundles: dict[str, Path], raw: bytes, problem: str
) -> None:
    tasks = TaskApi()
    async with bootstrap(command(bundles["ok"]), tasks=tasks) as run:
        answer = await run.api.answer(run.api.queue(None, raw=raw))
    assert answer.kind == "error"
    assert answer.body["errorType"] == "Runtime.InvalidEvent"
    assert problem in answer.body["errorMessage"]
    assert tasks.calls == []


async def test_a_canceled_task_is_acknowledged_without_running_the_handler(
    bundles: dict[str, Path],
) -> None:
    tasks = TaskApi()
    async with bootstrap(command(bundles["throws"]), tasks=tasks) as run:
        answer = await run.api.answer(run.api.queue(tasks.event(status="canceled")))
    assert answer.kind == "response"
    assert [c["outcome"] for c in tasks.routes("complete")] == ["canceled"]


async def test_a_bundle_without_the_handler_export_reports_an_init_error(
    bundles: dict[str, Path],
) -> None:
    async with bootstrap(command(bundles["no_export"])) as run:
        code = await asyncio.wait_for(run.proc.wait(), 30)
    assert code == 1
    ((header, body),) = run.api.init_errors
    assert header == body["errorType"] == "Runtime.HandlerNotFound"
    assert "exports no function handler" in body["errorMessage"]


def _in_seconds(seconds: float) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat()
