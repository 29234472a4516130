"""The runner as the platform's Lambda function: one invocation per Lambda invoke.

On AWS the Dispatcher's launcher invokes ``TRACE_LAMBDA_FUNCTION`` asynchronously with the
invoke payload (``trace_aws.lambda_invoker``). Deployed with ``handler`` below as its entry
point, that function does exactly what ``trace udf runner`` does for one invocation -- fetch
the bundle by its presigned URL, check the digest, start the bundle's runtime in its own
process with the minimal environment and limits, serve it the Runtime API, heartbeat, and
complete the attempt through ``/v1/task/*`` with the event's capability token only -- so the
same runtimes and bundles run unchanged in Lite and on Lambda, and nothing has to read the
Event invocation's response.

Environment of the function: ``TRACE_DISPATCHER_URL`` (where ``/v1/task/*`` is served),
``TRACE_UDF_BUNDLE_URL_PREFIX`` (the only prefix bundle URLs may have: the bucket's presigned
URL origin), ``TRACE_UDF_WORK_DIR`` (default ``/tmp/trace-udf``). No platform credential.
Lambda's execution environment provides the isolation (``docs/architecture/udf.md``).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from trace_core import wire
from trace_lite.udf.runner import Runner, RunnerConfig


def config_from_env(env: Mapping[str, str]) -> RunnerConfig:
    """The one-invocation runner's configuration. Raises ``KeyError`` for a missing
    variable."""
    return RunnerConfig(
        dispatcher_url=env["TRACE_DISPATCHER_URL"],
        work_dir=Path(env.get("TRACE_UDF_WORK_DIR", "/tmp/trace-udf")),
        isolation="none",
        bundle_url_prefix=env["TRACE_UDF_BUNDLE_URL_PREFIX"],
        python=sys.executable,
        node=shutil.which("node"),
        concurrency=1,
        keep_warm=False,
    )


async def run_one(config: RunnerConfig, payload: wire.LambdaInvokePayload) -> str:
    """Run one invocation to its completion; returns the outcome."""
    runner = Runner(config)
    await runner.start()
    try:
        return await runner.run(payload)
    finally:
        await runner.close()


def handler(event: Mapping[str, Any], context: object) -> dict[str, Any]:
    """The Lambda entry point. Returns ``{task_id, attempt, outcome}`` (read by nobody for an
    Event invocation; useful in logs and for a synchronous test invoke)."""
    payload = wire.structure(dict(event), wire.LambdaInvokePayload)
    config = config_from_env(os.environ)
    if not payload.bundle_url.startswith(config.bundle_url_prefix):
        return {"task_id": payload.task_id, "attempt": payload.attempt, "outcome": "refused"}
    outcome = asyncio.run(run_one(config, payload))
    return {"task_id": payload.task_id, "attempt": payload.attempt, "outcome": outcome}


__all__ = ["config_from_env", "handler", "run_one"]
