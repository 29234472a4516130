"""Worker-pool slots under kill -9, with real processes: worker processes holding slot leases
are SIGKILLed; their slots come back when the attempts' leases expire (the reaper), never more
attempts of the pooled job run at once than the pool has slots, no slot leaks, every task
completes exactly once, and every attempt (the killed ones included) saw exactly its own slot's
``env`` and ``secret_env`` (secrets in the org's namespace of the Lite SecretStore), never another
slot's, and never through the worker process's environment.

The workers are ``trace worker`` processes whose ``sleep`` operator records what each attempt
saw first (``slot_probe_worker.py``); the secret values then appear in no log and no row."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from e2e_harness import Proc, TraceProcs, start_user_stack, trace_cli
from secret_checks import assert_no_secret_anywhere, put_secrets

ORG = "acme"
SLOTS = 2
EVENTS = 10  # emit_events with n = 9: nine progress events and a final one

POOLED = f"""\
name: pooled
worker_pools:
  p:
    - env: {{SLOT_NAME: a}}
      secret_env: {{RPC_KEY: rpc/key-a}}
    - env: {{SLOT_NAME: b}}
      secret_env: {{RPC_KEY: rpc/key-b}}
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

#: The secret values behind each slot's ``secret_env`` (distinct, and found in nothing else).
SECRETS = {"rpc/key-a": "s3cr3t-a-5f0d7c2e91", "rpc/key-b": "s3cr3t-b-a8c34b67e2"}
#: What an attempt in each slot must see as its env, by slot index.
EXPECTED_ENV = [
    {"SLOT_NAME": "a", "RPC_KEY": SECRETS["rpc/key-a"]},
    {"SLOT_NAME": "b", "RPC_KEY": SECRETS["rpc/key-b"]},
]
PROBE_WORKER = Path(__file__).with_name("slot_probe_worker.py")

#: Attempts of the pooled job running now, and the workers running them.
RUNNING = """
SELECT a.worker_id, a.task_id::text, a.attempt, l.slot
FROM task_attempts a JOIN tasks t USING (task_id)
LEFT JOIN pool_slot_leases l ON (l.task_id, l.attempt) = (a.task_id, a.attempt)
WHERE t.dag_job = 'work' AND a.outcome = 'running'
"""


class Sampler(threading.Thread):
    """Counts the pooled job's running attempts every few milliseconds until stopped, and
    notes the slot each running attempt holds (the lease table keeps only a slot's latest)."""

    def __init__(self, t: TraceProcs) -> None:
        super().__init__(daemon=True)
        self.t = t
        self.stop = threading.Event()
        self.peak = 0
        self.samples = 0
        #: (task_id, attempt) -> the slots it was seen holding
        self.slots: dict[tuple[str, int], set[int | None]] = {}

    def run(self) -> None:
        while not self.stop.is_set():
            rows = self.t.sql(RUNNING)
            self.peak = max(self.peak, len(rows))
            for _, task_id, attempt, slot in rows:
                self.slots.setdefault((task_id, attempt), set()).add(slot)
            self.samples += 1
            self.stop.wait(0.02)


@pytest.fixture
def stack(trace_procs: TraceProcs, monkeypatch: pytest.MonkeyPatch) -> TraceProcs:
    start_user_stack(trace_procs, monkeypatch, ORG, {"dora": ["dag_deployer"]})
    put_secrets(trace_procs, ORG, SECRETS)
    return trace_procs


def probe_file(t: TraceProcs) -> Path:
    return t.home / "slot-probe.jsonl"


def start_probe_worker(t: TraceProcs, concurrency: int) -> Proc:
    """A ``trace worker`` process whose ``sleep`` records what each attempt saw (its log in
    the harness's log folder, stopped with the others)."""
    t._counter += 1
    log_path = t.log_dir / f"{t._counter:03d}-worker.log"
    env = {**t.env(), "E2E_SLOT_PROBE_FILE": str(probe_file(t))}
    with open(log_path, "ab") as out:
        popen = subprocess.Popen(
            [sys.executable, str(PROBE_WORKER), "worker", "--concurrency", str(concurrency)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=t.home,
        )
    proc = Proc("worker", popen, log_path)
    t.procs.append(proc)
    return proc


def probes(t: TraceProcs) -> dict[tuple[str, int], dict[str, Any]]:
    """What each attempt saw, by ``(task_id, attempt)`` (each attempt records once)."""
    path = probe_file(t)
    lines = path.read_text().splitlines() if path.exists() else []
    seen: dict[tuple[str, int], dict[str, Any]] = {}
    for line in lines:
        record = json.loads(line)
        key = (record["task_id"], record["attempt"])
        assert key not in seen, f"attempt {key} ran its operator twice"
        seen[key] = record
    return seen


def _kill_slot_holders(t: TraceProcs) -> list[tuple[str, int]]:
    """Wait until every slot is held by an attempt that is inside its operator (on record in
    the probe file), then SIGKILL the worker processes holding them (each attempt sleeps 3 s:
    they die mid-attempt). Returns the attempts they were running."""

    def all_held() -> list[tuple[Any, ...]] | None:
        rows = t.sql(RUNNING)
        seen = probes(t)
        inside = len(rows) == SLOTS and all((task, n) in seen for _, task, n, _ in rows)
        return rows if inside else None

    holders = t.wait_until(
        all_held,
        60,
        "every slot of the pool to be held by a running operator",
        interval=0.02,
    )
    pids = {int(worker_id.rsplit(":", 1)[1]) for worker_id, _, _, _ in holders}
    for proc in t.live("worker"):
        if proc.pid in pids:
            t.kill9(proc)
    return [(task_id, attempt) for _, task_id, attempt, _ in holders]


def test_slots_under_kill9_of_workers(stack: TraceProcs) -> None:
    t = stack
    dag_file = t.home / "pooled.yaml"
    dag_file.write_text(POOLED)
    done = trace_cli(t, "dora", "dag", "deploy", str(dag_file), "--org", ORG)
    assert done.returncode == 0, done.stderr
    for _ in range(3):  # more capacity than slots: the pool is the limit
        start_probe_worker(t, concurrency=4)
    sampler = Sampler(t)
    sampler.start()
    try:
        run = trace_cli(t, "dora", "dag", "trigger", ORG, "pooled", "src", "--run-id", "r1")
        assert run.returncode == 0, run.stderr
        killed: list[tuple[str, int]] = []
        for _ in range(2):  # two rounds: kill the slot holders, bring up a fresh worker
            killed += _kill_slot_holders(t)
            start_probe_worker(t, concurrency=4)

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
    # each attempt, the killed ones included, saw exactly its own slot's env and secret
    all_attempts = {
        (task_id, attempt)
        for task_id, attempt in t.sql(
            "SELECT a.task_id::text, a.attempt FROM task_attempts a JOIN tasks t USING (task_id) "
            "WHERE t.dag_job = 'work'"
        )
    }
    seen = probes(t)
    assert set(seen) == all_attempts == set(sampler.slots)
    assert set(killed) <= set(seen)
    assert {r["slot"] for r in seen.values()} == {0, 1}
    for key, record in seen.items():
        assert sampler.slots[key] == {record["slot"]}, (key, sampler.slots[key], record["slot"])
        assert record["env"] == EXPECTED_ENV[record["slot"]], key
        assert record["process_env"] == {}, key  # never in the worker process's environment
    assert_no_secret_anywhere(t, list(SECRETS.values()))
