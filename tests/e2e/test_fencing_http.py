"""Fencing over HTTP against a real Dispatcher process (no worker: the test is the worker).

A stale attempt -- its lease expired, the Dispatcher's own reaper re-queued the task, a newer
attempt was claimed -- is refused with 409 ``lease_lost`` on every attempt-scoped route and
writes nothing. A late completion of the *current* attempt, after reaping but before any new
claim, is accepted.
"""

from __future__ import annotations

import hashlib
from typing import Any

from e2e_harness import TraceProcs


def _fence(claim: dict[str, Any]) -> dict[str, Any]:
    return {k: claim[k] for k in ("task_id", "attempt", "lease_token")}


def _expire_and_wait_requeued(t: TraceProcs, task_id: str) -> None:
    t.sql(
        "UPDATE tasks SET lease_expires_at = now() - interval '1s' WHERE task_id = %s", (task_id,)
    )
    t.wait_until(
        lambda: t.scalar("SELECT state FROM tasks WHERE task_id = %s", (task_id,)) == "queued",
        15,
        "the reaper to expire the attempt and re-queue the task",
    )


def _task_row(t: TraceProcs, task_id: str) -> tuple[Any, ...]:
    return t.sql(
        "SELECT state, attempt, lease_token::text, lease_expires_at, result, error, "
        "updated_at FROM tasks WHERE task_id = %s",
        (task_id,),
    )[0]


def test_stale_attempt_gets_lease_lost_everywhere_and_writes_nothing(
    trace_procs: TraceProcs,
) -> None:
    t = trace_procs
    t.start_dispatcher()
    task_id = t.create_task("noop", max_attempts=5)
    org_id = str(t.scalar("SELECT org_id FROM tasks WHERE task_id = %s", (task_id,)))
    old = t.claim(task_id, "old-worker")
    assert old["attempt"] == 1
    # the old attempt works normally while it holds the lease
    r = t.request(
        "POST",
        "/v1/task/events",
        capability=old["capability_token"],
        body={**_fence(old), "events": [{"key": "e1", "type": "progress"}]},
    )
    assert r.status == 200 and r.json == {"accepted": 1, "duplicates": 0}, r

    _expire_and_wait_requeued(t, task_id)
    assert t.sql("SELECT attempt, outcome FROM task_attempts WHERE task_id = %s", (task_id,)) == [
        (1, "timed_out")
    ]
    new = t.claim(task_id, "new-worker")
    assert new["attempt"] == 2 and new["lease_token"] != old["lease_token"]

    before_counts = t.counts()
    before_task = _task_row(t, task_id)
    before_attempts = t.sql(
        "SELECT attempt, outcome, lease_expires_at, heartbeat_at, "
        "finished_at FROM task_attempts WHERE task_id = %s ORDER BY attempt",
        (task_id,),
    )
    old_fence = _fence(old)
    data = b'{"x":1}\n'
    batch = {
        "key": "b1",
        "dataset": "rows",
        "object_key": f"org/{org_id}/staging/task/{task_id}/attempt/1/buffer/b1.jsonl",
        "row_count": 1,
        "byte_size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    calls = {
        "/v1/task/heartbeat": old_fence,
        "/v1/task/events": {**old_fence, "events": [{"key": "e2", "type": "progress"}]},
        "/v1/task/buffer-publish": {**old_fence, "batch": batch},
        "/v1/task/complete": {
            **old_fence,
            "outcome": "succeeded",
            "result": {"stale": True},
            "final_events": [{"key": "done", "type": "done"}],
        },
    }
    for path, body in calls.items():
        r = t.request("POST", path, capability=old["capability_token"], body=body)
        assert r.status == 409, (path, r)
        assert r.json["error"] == "lease_lost", (path, r)
        assert isinstance(r.json["message"], str) and r.json["message"], (path, r)
    # a failed completion from the stale attempt is refused the same way
    r = t.request(
        "POST",
        "/v1/task/complete",
        capability=old["capability_token"],
        body={**old_fence, "outcome": "failed", "error": {"code": "x"}},
    )
    assert r.status == 409 and r.json["error"] == "lease_lost", r

    assert t.counts() == before_counts
    assert _task_row(t, task_id) == before_task
    assert (
        t.sql(
            "SELECT attempt, outcome, lease_expires_at, heartbeat_at, finished_at "
            "FROM task_attempts WHERE task_id = %s ORDER BY attempt",
            (task_id,),
        )
        == before_attempts
    )
    assert t.sql("SELECT event_key, attempt FROM task_events WHERE task_id = %s", (task_id,)) == [
        ("e1", 1)
    ]

    # the current attempt is unaffected and completes normally
    r = t.request(
        "POST",
        "/v1/task/complete",
        capability=new["capability_token"],
        body={**_fence(new), "result": {"by": "new"}},
    )
    assert r.status == 200 and r.json["state"] == "completed", r
    assert t.sql(
        "SELECT attempt, outcome FROM task_attempts WHERE task_id = %s ORDER BY attempt", (task_id,)
    ) == [(1, "timed_out"), (2, "succeeded")]
    assert t.scalar("SELECT result FROM tasks WHERE task_id = %s", (task_id,)) == {"by": "new"}


def test_late_completion_after_reaping_before_new_claim_is_accepted(
    trace_procs: TraceProcs,
) -> None:
    t = trace_procs
    t.start_dispatcher()
    task_id = t.create_task("noop", max_attempts=5)
    claim = t.claim(task_id)
    _expire_and_wait_requeued(t, task_id)
    # the lease is gone: heartbeats are refused...
    r = t.request(
        "POST", "/v1/task/heartbeat", capability=claim["capability_token"], body=_fence(claim)
    )
    assert r.status == 409 and r.json["error"] == "lease_lost", r
    # ...but the work is done and no newer attempt started: the completion is kept
    body = {
        **_fence(claim),
        "result": {"late": True},
        "final_events": [{"key": "done", "type": "done"}],
    }
    r = t.request("POST", "/v1/task/complete", capability=claim["capability_token"], body=body)
    assert r.status == 200, r
    assert r.json["state"] == "completed" and r.json["replay"] is False, r
    assert t.sql("SELECT state, attempt, result FROM tasks WHERE task_id = %s", (task_id,)) == [
        ("completed", 1, {"late": True})
    ]
    assert t.sql("SELECT attempt, outcome FROM task_attempts WHERE task_id = %s", (task_id,)) == [
        (1, "succeeded")
    ]
    # the same completion again is a replay; the queued wake-up can no longer start an attempt
    r = t.request("POST", "/v1/task/complete", capability=claim["capability_token"], body=body)
    assert r.status == 200 and r.json["replay"] is True, r
    r = t.request("POST", "/internal/task-claim", platform=True, body={"task_id": task_id})
    assert r.status == 409 and r.json["error"] == "task_not_claimable", r
    assert t.scalar("SELECT count(*) FROM task_attempts WHERE task_id = %s", (task_id,)) == 1
    assert t.scalar("SELECT count(*) FROM task_events WHERE task_id = %s", (task_id,)) == 1
