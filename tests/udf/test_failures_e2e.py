"""A UDF that crashes, hangs, runs out of memory, answers garbage or the wrong shape: each
attempt ends ``failed`` with an ``error.code`` naming the cause, the task is retried per its
``max_attempts``, nothing it emitted is published, and no process it started is left."""

from __future__ import annotations

import os
from typing import Any

import pytest

from conftest import UdfProcs, py_bundle

_POST = """
    import http.client, os, time

    def post(ctx, body):
        host, port = os.environ["AWS_LAMBDA_RUNTIME_API"].split(":")
        conn = http.client.HTTPConnection(host, int(port))
        path = f"/2018-06-01/runtime/invocation/{ctx.event.request_id}/response"
        conn.request("POST", path, body=body)
        conn.getresponse().read()
        time.sleep(600)
"""

CASES: dict[str, tuple[str, dict[str, Any], str, str]] = {
    "crash": (
        """
        import os
        def handler(ctx):
            ctx.emit_rows("out", [{"a": 1}])
            os._exit(3)
        """,
        {},
        "udf_crashed",
        "exited with code 3",
    ),
    "killed": (
        """
        import os, signal
        def handler(ctx):
            os.kill(os.getpid(), signal.SIGKILL)
        """,
        {},
        "udf_crashed",
        "killed by SIGKILL",
    ),
    "hang": (
        """
        import subprocess, sys, time
        def handler(ctx):
            ctx.emit_rows("out", [{"a": 1}])
            # a grandchild in its own session: it must not outlive the attempt either
            subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)",
                              "udf-marker-hang"], start_new_session=True)
            time.sleep(600)
        """,
        {"timeout_s": 2},
        "udf_timeout",
        "no answer within 2 s",
    ),
    "memory": (
        """
        def handler(ctx):
            ctx.emit_rows("out", [{"a": 1}])
            hog = bytearray(512 * 1024 * 1024)
            return {"n": len(hog)}
        """,
        {"memory_mb": 64},
        "udf_out_of_memory",
        "MemoryError",
    ),
    "garbage": (
        _POST
        + """
    def handler(ctx):
        post(ctx, b"\\x00\\xffnot json at all")
        """,
        {},
        "udf_invalid_response",
        "not JSON",
    ),
    "wrong_shape_posted": (
        _POST
        + """
    def handler(ctx):
        post(ctx, b'{"rows": [1, 2]}')
        """,
        {},
        "udf_invalid_response",
        "unknown field 'rows'",
    ),
    "wrong_shape_returned": (
        """
        def handler(ctx):
            ctx.emit_rows("out", [{"a": 1}])
            return [1, 2]
        """,
        {},
        "udf_error",
        "TypeError: a handler returns a dict or None, not list",
    ),
    "bad_event": (
        """
        def handler(ctx):
            ctx.emit_event("x", {}, key="not a valid key!")
            return {}
        """,
        {},
        "udf_invalid_response",
        "final_events",
    ),
    "raises": (
        """
        def handler(ctx):
            ctx.emit_rows("out", [{"a": 1}])
            raise ValueError("boom")
        """,
        {},
        "udf_error",
        "ValueError: boom",
    ),
    "import_fails": (
        """
        raise RuntimeError("cannot start")
        def handler(ctx):
            return {}
        """,
        {},
        "udf_init_error",
        "RuntimeError: cannot start",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_failing_udf_fails_its_attempts_with_the_cause_and_leaves_nothing(
    udf_procs: UdfProcs, case: str
) -> None:
    source, limits, code, message = CASES[case]
    udf_procs.start_runner()
    bundle = udf_procs.put_bundle(py_bundle("bad", source, **limits))
    task_id = udf_procs.create_task(
        "udf", {"bundle": bundle}, runtime="lambda", max_attempts=2, timeout_s=30
    )
    assert udf_procs.wait_terminal([task_id], 90) == {"failed": 1}
    attempts = udf_procs.sql(
        "SELECT attempt, outcome, error FROM task_attempts WHERE task_id = %s ORDER BY attempt",
        (task_id,),
    )
    assert [(a, o) for a, o, _ in attempts] == [(1, "failed"), (2, "failed")]  # retried once
    for _, _, error in attempts:
        assert error["code"] == code, error
        assert message in error["message"], error
        assert "bundle bad" in error["message"] or code == "udf_invalid_response"
    # nothing partial: no batch, no event of a failed attempt
    assert udf_procs.counts()["buffer_batches"] == 0
    assert udf_procs.scalar("SELECT count(*) FROM task_events WHERE task_id = %s", (task_id,)) == 0
    # nothing left running, the runner is fine
    udf_procs.wait_until(lambda: not udf_procs.udf_pids(), 10, "UDF processes to be gone")
    assert udf_procs.runner_health()["failed"] == 2


def test_a_non_retryable_error_fails_the_task_at_once(udf_procs: UdfProcs) -> None:
    udf_procs.start_runner()
    source = """
        from trace_udf import NonRetryableError
        def handler(ctx):
            raise NonRetryableError("input is malformed")
    """
    bundle = udf_procs.put_bundle(py_bundle("bad", source))
    task_id = udf_procs.create_task(
        "udf", {"bundle": bundle}, runtime="lambda", max_attempts=3, timeout_s=30
    )
    assert udf_procs.wait_terminal([task_id], 60) == {"failed": 1}
    [(attempt, error)] = udf_procs.sql(
        "SELECT attempt, error FROM task_attempts WHERE task_id = %s", (task_id,)
    )
    assert attempt == 1
    assert error["message"] == "bundle bad: NonRetryableError: input is malformed"


def test_what_a_handler_prints_is_a_log_not_an_answer(udf_procs: UdfProcs) -> None:
    udf_procs.start_runner()
    source = """
        import sys
        def handler(ctx):
            sys.stdout.buffer.write(b"\\x00\\xff{garbage\\n" * 100)
            sys.stdout.flush()
            print("udf says hello", file=sys.stderr, flush=True)
            return {"ok": True}
    """
    bundle = udf_procs.put_bundle(py_bundle("chatty", source))
    task_id = udf_procs.create_task("udf", {"bundle": bundle}, runtime="lambda", timeout_s=30)
    assert udf_procs.wait_terminal([task_id], 60) == {"completed": 1}
    assert udf_procs.runner is not None
    udf_procs.wait_until(
        lambda: "udf says hello" in udf_procs.runner.log_path.read_text(), 10, "the log line"
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="PID namespaces need root")
def test_the_pid_namespace_is_why_a_detached_grandchild_dies(udf_procs: UdfProcs) -> None:
    """Without namespaces a grandchild in its own session survives the kill (documented); this
    pins that the namespaced runner is what removes it."""
    udf_procs.start_runner(isolation="none")
    source, limits, _, _ = CASES["hang"]
    bundle = udf_procs.put_bundle(py_bundle("bad", source, **limits))
    task_id = udf_procs.create_task(
        "udf", {"bundle": bundle}, runtime="lambda", max_attempts=1, timeout_s=30
    )
    assert udf_procs.wait_terminal([task_id], 60) == {"failed": 1}
    survivors = udf_procs.udf_pids()
    try:
        assert survivors, "expected the detached grandchild to survive without a PID namespace"
    finally:
        for pid in survivors:
            os.kill(pid, 9)


def test_a_canceled_task_stops_its_runtime_and_acknowledges(udf_procs: UdfProcs) -> None:
    """The runner's heartbeat learns of the cancel: the runtime is killed (nothing left) and
    the attempt is completed ``canceled``."""
    udf_procs.start_runner()
    source = """
        import time
        def handler(ctx):
            ctx.emit_rows("out", [{"a": 1}])
            time.sleep(600)
    """
    bundle = udf_procs.put_bundle(py_bundle("slow", source))
    task_id = udf_procs.create_task(
        "udf", {"bundle": bundle}, runtime="lambda", max_attempts=3, timeout_s=120
    )
    udf_procs.wait_until(lambda: udf_procs.udf_pids(), 60, "the runtime to start")
    r = udf_procs.request("POST", f"/internal/admin/tasks/{task_id}/cancel", platform=True)
    assert r.status == 200, r
    udf_procs.wait_until(
        lambda: (
            udf_procs.sql("SELECT outcome FROM task_attempts WHERE task_id = %s", (task_id,))
            == [("canceled",)]
        ),
        60,
        "the attempt to be acknowledged canceled",
    )
    assert udf_procs.scalar("SELECT state FROM tasks WHERE task_id = %s", (task_id,)) == "canceled"
    udf_procs.wait_until(lambda: not udf_procs.udf_pids(), 10, "UDF processes to be gone")
    assert udf_procs.counts()["buffer_batches"] == 0
    assert udf_procs.runner_health()["canceled"] == 1
