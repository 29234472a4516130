"""The runner hosted as the platform's Lambda function (``trace_lite.udf.lambda_function``):
given only the invoke payload the AWS launcher builds, it runs the bundle and completes the
attempt against a real Dispatcher process -- the function is the runner, so nothing has to
read an Event invocation's response."""

from __future__ import annotations

import asyncio
import concurrent.futures
from typing import Any

import pytest

from conftest import UdfProcs, py_bundle
from trace_core import udf, wire
from trace_lite.config import LiteSettings
from trace_lite.local_store import LocalObjectStore
from trace_lite.udf import lambda_function

SOURCE = """
    import os
    def handler(ctx):
        ctx.emit_rows("out", [{"n": 1}, {"n": 2}])
        ctx.emit_event("done", {}, key="done")
        return {"where": os.environ["TRACE_TASK_API_URL"], "keys": sorted(os.environ)}
"""


def _without_runner(procs: UdfProcs) -> UdfProcs:
    """Restart the Dispatcher without a runner: ``runtime: lambda`` tasks wait in the outbox
    and the test plays the launcher."""
    base_env = procs.env
    procs.env = lambda: {  # type: ignore[method-assign]
        k: v for k, v in base_env().items() if k != "TRACE_UDF_RUNNER_URL"
    }
    procs.stop_all()
    procs.procs.clear()
    procs.start_dispatcher()
    return procs


def _event(procs: UdfProcs, task_id: str) -> dict[str, Any]:
    """What ``LambdaLauncher.launch`` sends: claim, fetch, presign, the one builder."""
    claim = wire.structure(procs.claim(task_id, "lambda:trace-udf"), wire.ClaimResponse)
    r = procs.request(
        "GET", f"/internal/task-fetch?task_id={task_id}&attempt={claim.attempt}", platform=True
    )
    task = wire.structure(r.json, wire.TaskPayload)
    settings = LiteSettings.from_env(procs.env())
    store = LocalObjectStore(settings.object_root, settings.dispatcher_url, settings.object_secret)
    url = asyncio.run(store.signed_url(udf.bundle_key(task), method="GET", expires_in=60))
    return wire.unstructure(udf.invoke_payload(task, claim, url))  # type: ignore[no-any-return]


def test_the_lambda_function_runs_one_invocation_and_completes_it(
    udf_procs: UdfProcs, monkeypatch: pytest.MonkeyPatch
) -> None:
    procs = _without_runner(udf_procs)
    bundle = procs.put_bundle(py_bundle("fn", SOURCE))
    task_id = procs.create_task("udf", {"bundle": bundle}, runtime="lambda", timeout_s=30)
    event = _event(procs, task_id)
    monkeypatch.setenv("TRACE_DISPATCHER_URL", procs.url)
    monkeypatch.setenv("TRACE_UDF_BUNDLE_URL_PREFIX", procs.url + "/o/")
    monkeypatch.setenv("TRACE_UDF_WORK_DIR", str(procs.runner_work))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # asyncio.run in its own thread
        answer = pool.submit(lambda_function.handler, event, None).result(120)
    assert answer == {"task_id": task_id, "attempt": 1, "outcome": "succeeded"}
    assert procs.wait_terminal([task_id], 30) == {"completed": 1}
    result = procs.scalar("SELECT result FROM tasks WHERE task_id = %s", (task_id,))
    assert result["where"] == procs.url
    assert "TRACE_DISPATCHER_URL" not in result["keys"]  # the function's own env stays out
    assert procs.sql("SELECT batch_key, row_count FROM buffer_batches") == [("out.0.0", 2)]


def test_a_bundle_url_outside_the_prefix_is_not_fetched(
    udf_procs: UdfProcs, monkeypatch: pytest.MonkeyPatch
) -> None:
    procs = _without_runner(udf_procs)
    bundle = procs.put_bundle(py_bundle("fn", SOURCE))
    task_id = procs.create_task("udf", {"bundle": bundle}, runtime="lambda", timeout_s=30)
    event = _event(procs, task_id)
    monkeypatch.setenv("TRACE_DISPATCHER_URL", procs.url)
    monkeypatch.setenv("TRACE_UDF_BUNDLE_URL_PREFIX", "https://bucket.example/")
    answer = lambda_function.handler(event, None)
    assert answer["outcome"] == "refused"
    assert procs.scalar("SELECT state FROM tasks WHERE task_id = %s", (task_id,)) == "running"
