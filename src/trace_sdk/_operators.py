"""Built-in operators for the demo, tests and benchmarks.

Each is ``async def op(ctx: TaskContext) -> dict | None``; payload fields are documented per op.
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

from trace_sdk._process import PLATFORM_TOKEN_ENV
from trace_sdk._worker import NonRetryableError, Operator, TaskContext
from trace_sdk.ingest import OPERATORS as INGEST_OPERATORS
from trace_sdk.ranges import OPERATORS as RANGE_OPERATORS


async def noop(ctx: TaskContext) -> dict[str, Any] | None:
    """Does nothing and succeeds."""
    return None


async def emit_events(ctx: TaskContext) -> dict[str, Any] | None:
    """Emits ``payload.n`` (default 3) progress events mid-task and one final event."""
    n = int(ctx.payload.get("n", 3))
    events = [{"key": f"progress-{i}", "type": "progress", "payload": {"i": i}} for i in range(n)]
    if events:
        await ctx.emit(events)
    ctx.final_events.append({"key": "done", "type": "done", "payload": {"n": n}})
    return {"emitted": n + 1}


async def fail_first_attempt(ctx: TaskContext) -> dict[str, Any] | None:
    """Fails (retryably) on attempt 1, succeeds on later attempts."""
    if ctx.attempt == 1:
        raise RuntimeError("failing the first attempt on purpose")
    return {"attempt": ctx.attempt}


async def fail_always(ctx: TaskContext) -> dict[str, Any] | None:
    """Fails every attempt; ``payload.fatal`` makes the failure non-retryable."""
    if ctx.payload.get("fatal"):
        raise NonRetryableError("fatal failure on purpose")
    raise RuntimeError("failing on purpose")


async def sleep(ctx: TaskContext) -> dict[str, Any] | None:
    """Sleeps ``payload.seconds`` (default 1) while the wrapper heartbeats."""
    await asyncio.sleep(float(ctx.payload.get("seconds", 1.0)))
    return {"slept": ctx.payload.get("seconds", 1.0)}


async def demo(ctx: TaskContext) -> dict[str, Any] | None:
    """The demo workload: emits ``payload.events`` events, publishes one buffer batch of
    ``payload.rows`` rows, and fails attempt 1 when ``payload.fail_first``."""
    n = int(ctx.payload.get("events", 2))
    await ctx.emit(
        [{"key": f"progress-{i}", "type": "progress", "payload": {"i": i}} for i in range(n)]
    )
    rows = [
        {"task_id": ctx.task.task_id, "row": i, "value": i * i}
        for i in range(int(ctx.payload.get("rows", 5)))
    ]
    await ctx.publish_buffer("demo_rows", rows, key="rows")
    if ctx.payload.get("fail_first") and ctx.attempt == 1:
        raise RuntimeError("demo: failing the first attempt on purpose")
    ctx.final_events.append({"key": "done", "type": "done", "payload": {"rows": len(rows)}})
    return {"rows": len(rows), "events": n + 1}


async def stage_output(ctx: TaskContext) -> dict[str, Any] | None:
    """Stages one JSON object for ``payload.dataset`` covering blocks ``[start, end)`` and
    commits it with the completion. ``payload.hang_first_s`` makes attempt 1 sleep that long
    after staging (so tests can kill the worker between staging and completing)."""
    start, end = int(ctx.payload.get("start", 0)), int(ctx.payload.get("end", 100))
    body = json.dumps(
        {"task_id": ctx.task.task_id, "attempt": ctx.attempt, "blocks": [start, end]},
        sort_keys=True,
    ).encode()
    await ctx.stage_output(
        str(ctx.payload.get("dataset", "blocks")),
        f"{start}_{end}.json",
        body,
        {"start": start, "end": end},
    )
    if ctx.attempt == 1 and ctx.payload.get("hang_first_s"):
        await asyncio.sleep(float(ctx.payload["hang_first_s"]))
    return {"staged": 1}


async def spawn_env(ctx: TaskContext) -> dict[str, Any] | None:
    """Runs ``env`` through ``ctx.run_process`` (no payload input) and reports the names of the
    variables the child saw, and whether the worker's own environment still holds the platform
    credential: a check that neither leaks to operator code or its children."""
    code, out = await ctx.run_process(["env"])
    names = sorted({line.split("=", 1)[0] for line in out.decode().splitlines() if "=" in line})
    return {
        "exit_code": code,
        "child_env": names,
        "worker_has_platform_token": PLATFORM_TOKEN_ENV in os.environ,
    }


BUILTIN: dict[str, Operator] = {
    "spawn_env": spawn_env,
    "stage_output": stage_output,
    "noop": noop,
    "emit_events": emit_events,
    "fail_first_attempt": fail_first_attempt,
    "fail_always": fail_always,
    "sleep": sleep,
    "demo": demo,
    **INGEST_OPERATORS,
    **RANGE_OPERATORS,
}
