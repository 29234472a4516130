"""The worker process drops the platform credential from its environment after reading it, and
what it spawns gets an explicit minimal environment: checked from inside a real worker process
by the ``spawn_env`` operator (it spawns ``env``)."""

from __future__ import annotations

from e2e_harness import TraceProcs


def test_worker_environment_holds_no_platform_credential(trace_procs: TraceProcs) -> None:
    t = trace_procs
    t.start_dispatcher()
    t.start_worker(concurrency=2)
    task_id = t.create_task("spawn_env")
    assert t.wait_terminal([task_id], timeout=60) == {"completed": 1}
    [(result,)] = t.sql(
        "SELECT result FROM tasks WHERE task_id = %s",
        (task_id,),
    )
    assert result["exit_code"] == 0
    assert result["worker_has_platform_token"] is False
    names = set(result["child_env"])
    assert "TRACE_PLATFORM_TOKEN" not in names
    assert not {n for n in names if n.startswith(("TRACE_", "AWS_", "PG"))}, names
    assert names <= {"PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "HOME"}, names
    # the worker was started with the credential in its environment: it did read it
    assert "TRACE_PLATFORM_TOKEN" in t.env()
