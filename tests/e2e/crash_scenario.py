"""The crash-safety scenario, shared by the Lite run (``test_crash_safety.py``) and the AWS run
(``test_aws_lifecycle.py``): waves of tasks through kill -9 of the Dispatcher and of workers at
random moments and one Postgres restart, with no manual recovery. Afterwards every task
completed exactly once, with exactly its events and buffer batches (each object read back
through ``TraceProcs.read_object`` and checked against its size and sha256), and the attempt
history is consistent.

Only the scale is a parameter; the faults and the assertions are the same for every profile.
Every run has at least one kill -9 of the Dispatcher, at least one kill -9 of a worker and,
when the cluster is the embedded one, one Postgres restart (skipped on an external cluster).

Faults come at random moments but always hit work in flight: every wave carries a few ``sleep``
tasks that outlast the wait before its fault, and a worker kill picks among the workers that
hold running attempts. (The quick tasks alone are often all done before the fault lands.)
"""

from __future__ import annotations

import hashlib
import random
import time
from collections import Counter

from e2e_harness import Proc, TraceProcs

from trace_lite.embedded_pg import EmbeddedPostgres

EXPECTED_EVENTS = {
    "noop": [],
    "sleep": [],
    "emit_events": ["done", "progress-0", "progress-1", "progress-2"],
    "demo": ["done", "progress-0", "progress-1"],
}
VICTIMS = ("dispatcher", "worker", "worker", "both")
SLEEP_EVERY = 20  # one task in 20 is a sleep ...
SLEEP_S = 2.5  # ... longer than the longest wait (1.5 s) between a wave and its fault


def _task(i: int) -> dict[str, object]:
    if i % SLEEP_EVERY == SLEEP_EVERY // 2:
        return {"operator": "sleep", "payload": {"seconds": SLEEP_S}, "max_attempts": 25}
    kind = ("noop", "emit_events", "demo")[i % 3]
    payload = {"noop": {}, "emit_events": {"n": 3}, "demo": {"events": 2, "rows": 3}}[kind]
    return {"operator": kind, "payload": payload, "max_attempts": 25}


def _busy(t: TraceProcs, procs: list[Proc]) -> list[int]:
    """Indexes of the live workers holding running attempts (worker ids are ``host:pid``)."""
    holders = {
        w.rsplit(":", 1)[-1]
        for (w,) in t.sql("SELECT DISTINCT worker_id FROM task_attempts WHERE outcome = 'running'")
    }
    return [i for i, p in enumerate(procs) if p.alive() and str(p.pid) in holders]


def run_crash_scenario(
    t: TraceProcs,
    pg_cluster: object,
    *,
    waves: int,
    per_wave: int,
    workers: int = 2,
    concurrency: int = 16,
    finish_timeout: float = 180.0,
) -> None:
    """``waves`` waves of ``per_wave`` tasks; after each wave one fault (the middle wave
    restarts Postgres). Then wait for everything and check exactly-once."""
    assert waves >= 3, "need room for a Dispatcher kill, a worker kill and the Postgres restart"
    seed = int(time.time())
    rng = random.Random(seed)
    print(f"chaos seed {seed}")
    can_restart_pg = isinstance(pg_cluster, EmbeddedPostgres)
    pg_wave = waves // 2 if can_restart_pg else -1
    # one fault per wave; at least one of each kill, the rest at random, in random order
    victims = ["dispatcher", "worker"] + [rng.choice(VICTIMS) for _ in range(waves - 3)]
    if not can_restart_pg:
        victims.append(rng.choice(VICTIMS))
    rng.shuffle(victims)
    started = time.monotonic()

    t.start_dispatcher()
    procs = [t.start_worker(concurrency=concurrency) for _ in range(workers)]
    ids: list[str] = []
    chaos: list[str] = []
    for wave in range(waves):
        ids += t.create_tasks([_task(len(ids) + i) for i in range(per_wave)])
        time.sleep(rng.uniform(0.2, 1.5))  # let the wave get in flight
        if wave == pg_wave:
            assert isinstance(pg_cluster, EmbeddedPostgres)
            pg_cluster.restart()
            chaos.append("postgres restart")
            t.wait_ready(timeout=60)
            continue
        victim = victims.pop()
        if victim in ("dispatcher", "both"):
            (d,) = t.live("dispatcher")
            t.kill9(d)
            chaos.append("kill -9 dispatcher")
        if victim in ("worker", "both"):
            i = rng.choice(_busy(t, procs) or range(len(procs)))
            t.kill9(procs[i])
            chaos.append(f"kill -9 worker {i}")
            time.sleep(rng.uniform(0.0, 0.5))
            procs[i] = t.start_worker(concurrency=concurrency)
        if victim in ("dispatcher", "both"):
            time.sleep(rng.uniform(0.0, 0.5))
            t.start_dispatcher()
    assert not victims
    if not can_restart_pg:
        chaos.append("(postgres restart skipped: external cluster)")
    chaos_s = time.monotonic() - started

    # Every process is back; no manual action from here on.
    states = t.wait_terminal(ids, timeout=finish_timeout)
    total_s = time.monotonic() - started
    assert states == {"completed": len(ids)}, states

    # exactly one succeeded attempt per task; no attempt left running
    succeeded = dict(
        t.sql(
            "SELECT t.task_id::text, count(a.*) FILTER (WHERE a.outcome = 'succeeded') "
            "FROM tasks t LEFT JOIN task_attempts a USING (task_id) GROUP BY t.task_id"
        )
    )
    assert len(succeeded) == len(ids)
    wrong = {k: v for k, v in succeeded.items() if v != 1}
    assert not wrong, f"tasks without exactly one succeeded attempt: {list(wrong.items())[:10]}"
    assert t.scalar("SELECT count(*) FROM task_attempts WHERE outcome = 'running'") == 0

    # the attempt history is consistent: numbered 1..n, n == tasks.attempt
    bad_history = t.sql(
        "SELECT t.task_id, t.attempt, count(a.*), min(a.attempt), max(a.attempt) "
        "FROM tasks t JOIN task_attempts a USING (task_id) GROUP BY t.task_id, t.attempt "
        "HAVING t.attempt <> count(a.*) OR min(a.attempt) <> 1 OR max(a.attempt) <> t.attempt"
    )
    assert not bad_history, bad_history[:10]
    # the succeeded attempt is the task's last one
    assert (
        t.scalar(
            "SELECT count(*) FROM tasks t JOIN task_attempts a USING (task_id) "
            "WHERE a.outcome = 'succeeded' AND a.attempt <> t.attempt"
        )
        == 0
    )

    # exactly the expected events per task (the key is the PK, so also check the count)
    operators = dict(t.sql("SELECT task_id::text, operator FROM tasks"))
    events = {
        k: v
        for k, v in t.sql(
            "SELECT task_id::text, array_agg(event_key ORDER BY event_key) FROM task_events "
            "GROUP BY task_id"
        )
    }
    wrong_events = {
        k: (op, events.get(k, []))
        for k, op in operators.items()
        if events.get(k, []) != EXPECTED_EVENTS[op]
    }
    assert not wrong_events, list(wrong_events.items())[:10]
    n_expected = sum(len(EXPECTED_EVENTS[op]) for op in operators.values())
    assert t.scalar("SELECT count(*) FROM task_events") == n_expected

    # one buffer batch per demo task, none for the others, each object intact in the store
    batches = t.sql("SELECT task_id::text, object_key, byte_size, sha256 FROM buffer_batches")
    per_task = Counter(b[0] for b in batches)
    demo_ids = {k for k, op in operators.items() if op == "demo"}
    assert set(per_task) == demo_ids and set(per_task.values()) == {1}, (
        len(per_task),
        len(demo_ids),
        per_task.most_common(3),
    )
    for task_id, object_key, size, sha in batches:
        data = t.read_object(object_key)
        assert len(data) == size and hashlib.sha256(data).hexdigest() == sha, task_id

    retried = t.scalar("SELECT count(*) FROM tasks WHERE attempt > 1")
    print(
        f"chaos: {chaos}; {len(ids)} tasks, {retried} needed more than one attempt; "
        f"chaos phase {chaos_s:.1f}s, total {total_s:.1f}s"
    )
    # the faults hit work in flight (a kill -9 of a busy worker always strands some leases)
    assert retried > 0, chaos
