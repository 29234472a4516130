"""SIGTERM of a worker running tasks: it exits within its grace period and no task is lost.

Tasks shorter than the grace are finished by the stopping worker; longer ones are given back
(completed as failed/retryable ``worker_shutdown``) and finished by another worker at once,
without waiting for their lease to expire.
"""

from __future__ import annotations

from e2e_harness import TraceProcs


def test_sigterm_worker_drains_or_releases_its_tasks(trace_procs: TraceProcs) -> None:
    t = trace_procs
    grace_s = t.lease_s  # the CLI's worker grace is min(30 s, lease)
    t.start_dispatcher()
    first = t.start_worker(concurrency=8)
    short = t.create_tasks([{"operator": "sleep", "payload": {"seconds": 1.0}} for _ in range(3)])
    long = t.create_tasks(
        [{"operator": "sleep", "payload": {"seconds": grace_s + 5}} for _ in range(3)]
    )
    ids = short + long
    t.wait_until(
        lambda: (
            t.scalar(
                "SELECT count(*) FROM task_attempts WHERE outcome = "
                "'running' AND task_id = ANY(%s::uuid[])",
                (ids,),
            )
            == 6
        ),
        20,
        "the first worker to start all six tasks",
    )
    first_worker_id = t.scalar("SELECT DISTINCT worker_id FROM task_attempts")
    assert first_worker_id.endswith(f":{first.pid}")

    # it exits (code 0) without waiting for the long tasks: they are handed back below, not
    # finished, which is what stopping within the grace period means (no elapsed-time check)
    code = t.terminate(first, timeout=grace_s + 10)
    assert code == 0, f"worker exited with {code}\n{t.log_tails()}"

    # the short tasks were finished by the stopping worker
    rows = t.sql("SELECT state, attempt FROM tasks WHERE task_id = ANY(%s::uuid[])", (short,))
    assert rows == [("completed", 1)] * 3, rows
    # the long ones were handed back at once, not left to lease expiry
    rows = t.sql(
        "SELECT a.outcome, a.error->>'code', t.state FROM task_attempts a "
        "JOIN tasks t USING (task_id) WHERE task_id = ANY(%s::uuid[])",
        (long,),
    )
    assert len(rows) == 3, rows
    for outcome, code, state in rows:
        assert (outcome, code) == ("failed", "worker_shutdown"), rows
        assert state in ("pending", "queued"), rows  # retry backoff, then re-queued

    second = t.start_worker(concurrency=8)
    states = t.wait_terminal(ids, timeout=grace_s + 40)
    assert states == {"completed": 6}, states
    attempts = t.sql(
        "SELECT task_id::text, attempt, outcome, worker_id FROM task_attempts "
        "WHERE task_id = ANY(%s::uuid[]) ORDER BY task_id, attempt",
        (long,),
    )
    by_task: dict[str, list[tuple[int, str, str]]] = {}
    for task_id, attempt, outcome, worker_id in attempts:
        by_task.setdefault(task_id, []).append((attempt, outcome, worker_id))
    for task_id, history in by_task.items():
        assert [(a, o) for a, o, _ in history] == [(1, "failed"), (2, "succeeded")], (
            task_id,
            history,
        )
        assert history[1][2].endswith(f":{second.pid}"), history
    assert t.scalar("SELECT count(*) FROM task_attempts WHERE outcome = 'timed_out'") == 0
    assert t.scalar("SELECT count(*) FROM task_attempts WHERE outcome = 'succeeded'") == 6
