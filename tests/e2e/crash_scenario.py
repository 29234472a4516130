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

With several Dispatchers (``TraceProcs(dispatchers=N)``, ADR 0003), the workers are spread over
them, each wave's tasks are created through all of them in turn, every Dispatcher is killed at
least once, and the database records (by ``application_name``, through test triggers) which
process published each wake-up and ended each attempt: every attempt ends once, every wake-up
row is published, and the outbox work is split between the Dispatchers.
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


# Test-only triggers: which database session (application_name) published an outbox row and
# changed an attempt's outcome (``old->new``; a write of ``timed_out`` over ``timed_out`` is
# recorded too: that would be a second expiry of one attempt). Only committed work is recorded
# (the insert is in the same transaction), so a process killed mid-transaction leaves none.
WORK_LOG_SQL = """
CREATE TABLE e2e_work_log (
    kind text NOT NULL, item text NOT NULL, detail text, app text NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE FUNCTION e2e_log_outbox() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.state IS DISTINCT FROM OLD.state THEN
        INSERT INTO e2e_work_log (kind, item, detail, app)
        VALUES ('outbox', NEW.id::text, NEW.topic || ':' || NEW.state,
                current_setting('application_name'));
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER e2e_log_outbox AFTER UPDATE ON outbox
    FOR EACH ROW EXECUTE FUNCTION e2e_log_outbox();
CREATE FUNCTION e2e_log_attempt() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.outcome IS DISTINCT FROM OLD.outcome OR NEW.outcome = 'timed_out' THEN
        INSERT INTO e2e_work_log (kind, item, detail, app)
        VALUES ('attempt', NEW.task_id::text || '/' || NEW.attempt,
                OLD.outcome || '->' || NEW.outcome, current_setting('application_name'));
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER e2e_log_attempt AFTER UPDATE ON task_attempts
    FOR EACH ROW EXECUTE FUNCTION e2e_log_attempt();
"""


def _check_work_split(t: TraceProcs, n_dispatchers: int) -> str:
    """No attempt expired twice, or ended twice except a late result after its expiry; every
    wake-up row was published; with several Dispatchers, each one published some of them and
    only Dispatchers expired attempts. Returns a summary for the report."""
    twice = t.sql(
        "SELECT item, array_agg(detail || ' by ' || app ORDER BY at) FROM e2e_work_log "
        "WHERE kind = 'attempt' GROUP BY item "
        "HAVING count(*) FILTER (WHERE detail LIKE '%->timed_out') > 1 "
        "OR count(*) FILTER (WHERE detail LIKE 'running->%') <> 1 "
        "OR count(*) FILTER (WHERE detail NOT LIKE 'running->%' "
        "    AND detail NOT LIKE 'timed_out->%') > 0"
    )
    assert not twice, f"attempts expired or ended twice: {twice[:10]}"
    assert (
        t.scalar("SELECT count(*) FROM outbox WHERE topic = 'wake' AND state <> 'published'") == 0
    )
    published = dict(
        t.sql(
            "SELECT app, count(*) FROM e2e_work_log "
            "WHERE kind = 'outbox' AND detail = 'wake:published' GROUP BY app"
        )
    )
    timed_out = dict(
        t.sql(
            "SELECT app, count(*) FROM e2e_work_log "
            "WHERE kind = 'attempt' AND detail = 'running->timed_out' GROUP BY app"
        )
    )
    summary = f"wake-ups published by {published}; attempts timed out by {timed_out}"
    if n_dispatchers > 1:
        names = {t.app_name(i) for i in range(n_dispatchers)}
        assert set(published) == names, summary
        # the reaper's expirations are Dispatcher work too, whichever Dispatcher did them
        assert timed_out and set(timed_out) <= names, summary
    return summary


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
    n_dispatchers = len(t.ports)
    assert waves >= 2 + n_dispatchers, "need room to kill every Dispatcher once"
    victims = ["dispatcher"] * n_dispatchers + ["worker"]
    victims += [rng.choice(VICTIMS) for _ in range(waves - 2 - n_dispatchers)]
    if not can_restart_pg:
        victims.append(rng.choice(VICTIMS))
    rng.shuffle(victims)
    # which Dispatcher each Dispatcher kill hits: every one at least once, in random order
    kill_order = list(range(n_dispatchers))
    rng.shuffle(kill_order)
    started = time.monotonic()

    t.sql(WORK_LOG_SQL)
    for i in range(n_dispatchers):
        t.start_dispatcher(index=i)
    procs = [
        t.start_worker(concurrency=concurrency, dispatcher=i % n_dispatchers)
        for i in range(workers)
    ]
    ids: list[str] = []
    chaos: list[str] = []
    chunk = max(1, per_wave // (2 * n_dispatchers)) if n_dispatchers > 1 else per_wave
    for wave in range(waves):
        ids += t.create_tasks(
            [_task(len(ids) + i) for i in range(per_wave)], chunk=chunk, spread=True
        )
        time.sleep(rng.uniform(0.2, 1.5))  # let the wave get in flight
        if wave == pg_wave:
            assert isinstance(pg_cluster, EmbeddedPostgres)
            pg_cluster.restart()
            chaos.append("postgres restart")
            t.wait_ready(timeout=60)
            continue
        victim = victims.pop()
        target = -1
        if victim in ("dispatcher", "both"):
            target = kill_order.pop() if kill_order else rng.randrange(n_dispatchers)
            (d,) = [p for p in t.live("dispatcher") if p.index == target]
            t.kill9(d)
            chaos.append(
                f"kill -9 dispatcher {target}" if n_dispatchers > 1 else "kill -9 dispatcher"
            )
        if victim in ("worker", "both"):
            i = rng.choice(_busy(t, procs) or range(len(procs)))
            t.kill9(procs[i])
            chaos.append(f"kill -9 worker {i}")
            time.sleep(rng.uniform(0.0, 0.5))
            procs[i] = t.start_worker(concurrency=concurrency, dispatcher=i % n_dispatchers)
        if victim in ("dispatcher", "both"):
            time.sleep(rng.uniform(0.0, 0.5))
            t.start_dispatcher(index=target)
    assert not victims and not kill_order
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

    split = _check_work_split(t, n_dispatchers)
    retried = t.scalar("SELECT count(*) FROM tasks WHERE attempt > 1")
    print(
        f"chaos: {chaos}; {len(ids)} tasks, {retried} needed more than one attempt; "
        f"{split}; chaos phase {chaos_s:.1f}s, total {total_s:.1f}s"
    )
    # the faults hit work in flight (a kill -9 of a busy worker always strands some leases)
    assert retried > 0, chaos
