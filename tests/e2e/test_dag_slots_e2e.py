"""Worker-pool slots under kill -9, with real processes: worker processes holding slot leases
are SIGKILLed; their slots come back when the attempts' leases expire (the reaper), never more
attempts of the pooled job run at once than the pool has slots, no slot leaks, and every task
completes exactly once."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from e2e_harness import TraceProcs, start_user_stack, trace_cli

ORG = "acme"
SLOTS = 2
EVENTS = 10  # emit_events with n = 9: nine progress events and a final one

POOLED = f"""\
name: pooled
worker_pools:
  p:
    - env: {{SLOT_NAME: a}}
    - env: {{SLOT_NAME: b}}
jobs:
  src:
    operator: emit_events
    config: {{n: {EVENTS - 1}}}
    triggers:
      - type: manual
    outputs:
      - {{storage: object_store, update_strategy: append}}
  work:
    operator: sleep
    config: {{seconds: 3.0}}
    worker_pool: p
    timeout: 30s
    max_attempts: 10
    inputs:
      - from: {{job: src}}
"""

#: Attempts of the pooled job running now, and the workers running them.
RUNNING = """
SELECT a.worker_id, a.task_id::text, a.attempt FROM task_attempts a JOIN tasks t USING (task_id)
WHERE t.dag_job = 'work' AND a.outcome = 'running'
"""


class Sampler(threading.Thread):
    """Counts the pooled job's running attempts every few milliseconds until stopped."""

    def __init__(self, t: TraceProcs) -> None:
        super().__init__(daemon=True)
        self.t = t
        self.stop = threading.Event()
        self.peak = 0
        self.samples = 0

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, len(self.t.sql(RUNNING)))
            self.samples += 1
            self.stop.wait(0.02)


@pytest.fixture
def stack(trace_procs: TraceProcs, monkeypatch: pytest.MonkeyPatch) -> TraceProcs:
    start_user_stack(trace_procs, monkeypatch, ORG, {"dora": ["dag_deployer"]})
    return trace_procs


def _kill_slot_holders(t: TraceProcs) -> list[tuple[str, int]]:
    """Wait until every slot is held, then SIGKILL the worker processes holding them (each
    attempt sleeps 3 s: they die mid-attempt). Returns the attempts they were running."""

    def all_held() -> list[tuple[Any, ...]] | None:
        rows = t.sql(RUNNING)
        return rows if len(rows) == SLOTS else None

    holders = t.wait_until(
        all_held,
        60,
        "every slot of the pool to be held",
        interval=0.02,
    )
    pids = {int(worker_id.rsplit(":", 1)[1]) for worker_id, _, _ in holders}
    for proc in t.live("worker"):
        if proc.pid in pids:
            t.kill9(proc)
    return [(task_id, attempt) for _, task_id, attempt in holders]


def test_slots_under_kill9_of_workers(stack: TraceProcs) -> None:
    t = stack
    dag_file = t.home / "pooled.yaml"
    dag_file.write_text(POOLED)
    done = trace_cli(t, "dora", "dag", "deploy", str(dag_file), "--org", ORG)
    assert done.returncode == 0, done.stderr
    for _ in range(3):  # more capacity than slots: the pool is the limit
        t.start_worker(concurrency=4)
    sampler = Sampler(t)
    sampler.start()
    try:
        run = trace_cli(t, "dora", "dag", "trigger", ORG, "pooled", "src", "--run-id", "r1")
        assert run.returncode == 0, run.stderr
        killed: list[tuple[str, int]] = []
        for _ in range(2):  # two rounds: kill the slot holders, bring up a fresh worker
            killed += _kill_slot_holders(t)
            t.start_worker(concurrency=4)

        def finished() -> list[tuple[Any, ...]] | None:
            rows = t.sql("SELECT state, count(*) FROM tasks WHERE dag_job = 'work' GROUP BY state")
            return rows if rows == [("completed", EVENTS)] else None

        t.wait_until(finished, 120, "every pooled task to complete")
    finally:
        sampler.stop.set()
        sampler.join(10)
    assert sampler.samples > 50
    # never more attempts of the pooled job at once than slots, even with dead workers' leases
    assert sampler.peak == SLOTS
    attempts = t.sql(
        "SELECT a.outcome, count(*) FROM task_attempts a JOIN tasks t USING (task_id) "
        "WHERE t.dag_job = 'work' GROUP BY a.outcome ORDER BY a.outcome"
    )
    by_outcome = dict(attempts)
    assert by_outcome["succeeded"] == EVENTS  # each task completed exactly once
    assert "running" not in by_outcome
    assert len(killed) == 2 * SLOTS
    for task_id, attempt in killed:  # the killed attempts ended by lease expiry, not success
        outcome = t.scalar(
            "SELECT outcome FROM task_attempts WHERE task_id = %s AND attempt = %s",
            (task_id, attempt),
        )
        assert outcome == "timed_out", (task_id, attempt, outcome)
    # no slot leaked: every lease row names a finished attempt
    assert (
        t.scalar(
            "SELECT count(*) FROM pool_slot_leases l JOIN task_attempts a "
            "ON (a.task_id, a.attempt) = (l.task_id, l.attempt) WHERE a.outcome = 'running'"
        )
        == 0
    )
    assert t.scalar("SELECT max(slot) FROM pool_slot_leases") == SLOTS - 1
