"""The Lite runner end to end: a Dispatcher process sends a ``runtime: lambda`` task to a
``trace udf runner`` process, which fetches the bundle, checks its digest, runs the Python
runtime over the Lambda Runtime API and completes the attempt with its capability token."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from conftest import UdfProcs, py_bundle
from trace_servers import udf_cli

HELLO = """
    import os
    from trace_udf import Context

    def handler(ctx: Context) -> dict:
        ctx.emit_rows("hello_rows", [{"n": i} for i in range(ctx.payload["n"])])
        ctx.emit_event("hello.done", {"n": ctx.payload["n"]}, key="done")
        return {"env": sorted(os.environ), "attempt": ctx.event.attempt,
                "task_api": os.environ["TRACE_TASK_API_URL"]}
"""


def _task(procs: UdfProcs, bundle: dict[str, str], **payload: Any) -> str:
    return procs.create_task(
        "udf", {"bundle": bundle, **payload}, runtime="lambda", max_attempts=2, timeout_s=30
    )


def _attempts(procs: UdfProcs, task_id: str) -> list[tuple[Any, ...]]:
    return procs.sql(
        "SELECT attempt, outcome, error FROM task_attempts WHERE task_id = %s ORDER BY attempt",
        (task_id,),
    )


def test_a_python_udf_runs_and_completes_with_rows_and_events(udf_procs: UdfProcs) -> None:
    udf_procs.start_runner()
    bundle = udf_procs.put_bundle(py_bundle("hello", HELLO))
    task_id = _task(udf_procs, bundle, n=3)
    assert udf_procs.wait_terminal([task_id], 60) == {"completed": 1}
    result = udf_procs.scalar("SELECT result FROM tasks WHERE task_id = %s", (task_id,))
    assert result["attempt"] == 1
    # the runtime's whole environment: nothing of the runner's, no credential
    assert set(result["env"]) == {
        "AWS_LAMBDA_RUNTIME_API",
        "TRACE_TASK_API_URL",
        "_HANDLER",
        "LAMBDA_TASK_ROOT",
        "AWS_LAMBDA_FUNCTION_NAME",
        "AWS_LAMBDA_FUNCTION_VERSION",
        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
        "PATH",
        "LANG",
        "TZ",
        "HOME",
        "TMPDIR",
    }
    events = udf_procs.sql(
        "SELECT event_type, payload FROM task_events WHERE task_id = %s", (task_id,)
    )
    assert events == [("hello.done", {"n": 3})]
    batches = udf_procs.sql(
        "SELECT batch_key, dataset, row_count FROM buffer_batches WHERE task_id = %s",
        (task_id,),
    )
    assert batches == [("hello_rows.0.0", "hello_rows", 3)]
    health = udf_procs.runner_health()
    assert health["succeeded"] == 1 and health["cold_starts"] == 1
    assert udf_procs.runner is not None
    log = udf_procs.runner.log_path.read_text()
    assert json.dumps(udf_procs.env()["TRACE_PLATFORM_TOKEN"])[1:-1] not in log


def test_without_namespaces_the_runtime_calls_the_dispatcher_directly(
    udf_procs: UdfProcs,
) -> None:
    udf_procs.start_runner(isolation="none")
    bundle = udf_procs.put_bundle(py_bundle("hello", HELLO))
    task_id = _task(udf_procs, bundle, n=1)
    assert udf_procs.wait_terminal([task_id], 60) == {"completed": 1}
    result = udf_procs.scalar("SELECT result FROM tasks WHERE task_id = %s", (task_id,))
    assert result["task_api"] == udf_procs.url
    assert udf_procs.runner_health()["isolation"] == "none"


def test_a_warm_runtime_serves_the_next_invocation_of_the_same_bundle(
    udf_procs: UdfProcs,
) -> None:
    udf_procs.start_runner()
    bundle = udf_procs.put_bundle(py_bundle("hello", HELLO))
    for n in (1, 2, 3):
        task_id = _task(udf_procs, bundle, n=n)
        assert udf_procs.wait_terminal([task_id], 60) == {"completed": 1}
    health = udf_procs.runner_health()
    assert (health["cold_starts"], health["warm_starts"], health["succeeded"]) == (1, 2, 3)


def test_a_bundle_whose_bytes_are_not_its_digest_never_runs(udf_procs: UdfProcs) -> None:
    udf_procs.start_runner()
    bundle = udf_procs.put_bundle(py_bundle("hello", HELLO))
    other = py_bundle("hello", HELLO.replace("hello.done", "other.done"))
    key = udf_procs.object_root / "objects" / "org" / udf_procs.org_id() / "bundles" / "hello"
    (key / f"sha256-{bundle['digest'][7:]}.zip").write_bytes(other)  # swapped in the store
    task_id = _task(udf_procs, bundle, n=1)
    assert udf_procs.wait_terminal([task_id], 60) == {"failed": 1}
    [(attempt, outcome, error)] = _attempts(udf_procs, task_id)  # not retried: it cannot pass
    assert (attempt, outcome, error["code"]) == (1, "failed", "udf_bad_bundle")
    assert bundle["digest"] in error["message"]
    assert udf_procs.runner_health()["cold_starts"] == 0


NODE_SDK = Path(__file__).resolve().parents[2] / "sdks" / "node"


@pytest.mark.skipif(
    shutil.which("node") is None or not (NODE_SDK / "node_modules" / "esbuild").exists(),
    reason="needs node and the Node SDK's build dependencies",
)
def test_a_node_bundle_runs_through_the_same_runner(udf_procs: UdfProcs, tmp_path: Path) -> None:
    """The runner starts a Node bundle (``node <root>/runtime.mjs``) built by the Node SDK over
    the same Runtime API: one DAG may mix languages."""
    out = tmp_path / "squares"
    built = subprocess.run(
        ["node", str(NODE_SDK / "build.mjs"), str(NODE_SDK / "examples" / "squares"), str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert built.returncode == 0, built.stderr
    _, data = udf_cli.build(out)
    udf_procs.start_runner()
    bundle = udf_procs.put_bundle(data)
    task_id = _task(udf_procs, bundle, n=2)
    assert udf_procs.wait_terminal([task_id], 60) == {"completed": 1}
    result = udf_procs.scalar("SELECT result FROM tasks WHERE task_id = %s", (task_id,))
    assert result == {"emitted": 2, "base": 0, "attempt": 1}
    batches = udf_procs.sql("SELECT batch_key, dataset, row_count FROM buffer_batches")
    assert batches == [("squares.0.0", "squares", 2)]
