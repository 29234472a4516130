"""The full lifecycle through real processes: Dispatcher + one worker + the Postgres queue."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from e2e_harness import TraceProcs


def _object_file(root: Path, object_key: str) -> Path:
    matches = [p for p in root.rglob("*") if p.is_file() and p.as_posix().endswith(object_key)]
    assert len(matches) == 1, f"object {object_key} not found exactly once under {root}: {matches}"
    return matches[0]


@pytest.mark.trace_lease(4)
def test_lifecycle_of_every_builtin_operator(trace_procs: TraceProcs) -> None:
    t = trace_procs
    t.start_dispatcher()
    t.start_worker(concurrency=4)

    # Canceled before any worker can claim it: created delayed (pending), canceled at once.
    canceled = t.create_task("noop", delay_s=600)
    r = t.request("POST", f"/internal/admin/tasks/{canceled}/cancel", platform=True)
    assert r.status == 200 and r.json["state"] == "canceled", r

    demo = t.create_task("demo", {"events": 2, "rows": 5})
    emit = t.create_task("emit_events", {"n": 3})
    flaky = t.create_task("fail_first_attempt", max_attempts=3)
    # 2.5 lease periods: the lease expires unless heartbeats (every lease/4) extend it.
    sleeper = t.create_task("sleep", {"seconds": t.lease_s * 2.5}, timeout_s=60)
    # demo failing its first attempt after publishing its batch: the retry re-publishes the
    # same key from its own staging prefix, which must count as a duplicate
    demo_retry = t.create_task("demo", {"events": 1, "rows": 2, "fail_first": True}, max_attempts=3)
    ids = [demo, emit, flaky, sleeper, demo_retry]
    states = t.wait_terminal(ids, timeout=60)
    assert states == {"completed": 5}, states

    # demo: completed exactly once, its events, one buffer batch whose object is intact
    assert t.sql("SELECT state, attempt FROM tasks WHERE task_id = %s", (demo,)) == [
        ("completed", 1)
    ]
    assert t.sql("SELECT attempt, outcome FROM task_attempts WHERE task_id = %s", (demo,)) == [
        (1, "succeeded")
    ]
    events = t.sql(
        "SELECT event_key, event_type, attempt FROM task_events WHERE task_id = %s ORDER BY seq",
        (demo,),
    )
    assert events == [
        ("progress-0", "progress", 1),
        ("progress-1", "progress", 1),
        ("done", "done", 1),
    ]
    batches = t.sql(
        "SELECT batch_key, dataset, object_key, row_count, byte_size, sha256, attempt "
        "FROM buffer_batches WHERE task_id = %s",
        (demo,),
    )
    assert len(batches) == 1, batches
    key, dataset, object_key, rows, size, sha, attempt = batches[0]
    assert (key, dataset, rows, attempt) == ("rows", "demo_rows", 5, 1)
    assert f"/task/{demo}/attempt/1/" in object_key
    data = _object_file(t.object_root, object_key).read_bytes()
    assert len(data) == size
    assert hashlib.sha256(data).hexdigest() == sha
    lines = [json.loads(line) for line in data.decode().splitlines()]
    assert lines == [{"row": i, "task_id": demo, "value": i * i} for i in range(5)]
    result = t.scalar("SELECT result FROM tasks WHERE task_id = %s", (demo,))
    assert result == {"rows": 5, "events": 3}

    # emit_events n=3: three progress events mid-task and the final one, once each
    assert t.sql("SELECT event_key FROM task_events WHERE task_id = %s ORDER BY seq", (emit,)) == [
        ("progress-0",),
        ("progress-1",),
        ("progress-2",),
        ("done",),
    ]
    assert t.sql("SELECT outcome FROM task_attempts WHERE task_id = %s", (emit,)) == [
        ("succeeded",)
    ]

    # fail_first_attempt: attempt 1 failed, attempt 2 succeeded
    assert t.sql(
        "SELECT attempt, outcome FROM task_attempts WHERE task_id = %s ORDER BY attempt", (flaky,)
    ) == [(1, "failed"), (2, "succeeded")]
    assert t.sql("SELECT state, attempt FROM tasks WHERE task_id = %s", (flaky,)) == [
        ("completed", 2)
    ]
    err = t.scalar("SELECT error FROM task_attempts WHERE task_id = %s AND attempt = 1", (flaky,))
    assert err["code"] == "operator_error", err

    # sleep longer than the lease: kept alive by heartbeats, never reaped, one attempt
    assert t.sql(
        "SELECT attempt, outcome, heartbeat_at IS NOT NULL FROM task_attempts WHERE task_id = %s",
        (sleeper,),
    ) == [(1, "succeeded", True)]
    assert t.scalar("SELECT attempt FROM tasks WHERE task_id = %s", (sleeper,)) == 1

    # demo retried: one batch (the first attempt's pointer), events once, 2 attempts
    assert t.sql(
        "SELECT attempt, outcome FROM task_attempts WHERE task_id = %s ORDER BY attempt",
        (demo_retry,),
    ) == [(1, "failed"), (2, "succeeded")]
    assert t.sql(
        "SELECT batch_key, attempt FROM buffer_batches WHERE task_id = %s", (demo_retry,)
    ) == [("rows", 1)]
    assert t.sql(
        "SELECT event_key FROM task_events WHERE task_id = %s ORDER BY seq", (demo_retry,)
    ) == [("progress-0",), ("done",)]

    # the canceled task never ran
    assert t.sql("SELECT state, attempt FROM tasks WHERE task_id = %s", (canceled,)) == [
        ("canceled", 0)
    ]
    assert t.scalar("SELECT count(*) FROM task_attempts WHERE task_id = %s", (canceled,)) == 0
    assert t.scalar("SELECT count(*) FROM task_events WHERE task_id = %s", (canceled,)) == 0

    # every wake-up went through the outbox and was consumed
    t.wait_until(
        lambda: t.scalar("SELECT count(*) FROM queue_messages") == 0, 10, "the queue to drain"
    )
    assert (
        t.scalar("SELECT count(*) FROM outbox WHERE topic = 'wake' AND state <> 'published'") == 0
    )


def test_canceled_while_queued_is_acknowledged_without_running(trace_procs: TraceProcs) -> None:
    """A queued task (wake-up already on the queue) canceled before any worker exists: when a
    worker starts, it sees the wake-up, and the task still never gets an attempt."""
    t = trace_procs
    t.start_dispatcher()
    task_id = t.create_task("emit_events", {"n": 1})
    t.wait_until(
        lambda: t.scalar("SELECT count(*) FROM queue_messages") == 1,
        10,
        "the wake-up to reach the queue",
    )
    r = t.request("POST", f"/internal/admin/tasks/{task_id}/cancel", platform=True)
    assert r.status == 200 and r.json["state"] == "canceled", r
    t.start_worker(concurrency=2)
    t.wait_until(
        lambda: t.scalar("SELECT count(*) FROM queue_messages") == 0,
        20,
        "the worker to consume the wake-up",
    )
    assert t.sql("SELECT state, attempt FROM tasks WHERE task_id = %s", (task_id,)) == [
        ("canceled", 0)
    ]
    assert t.scalar("SELECT count(*) FROM task_attempts") == 0
    assert t.scalar("SELECT count(*) FROM task_events") == 0
