"""Duplicate, reordered and junk wake-up messages never cause a second execution; a poison
wake-up goes to the dead-letter queue at once and never stops the rest of its receive or the
worker."""

from __future__ import annotations

import asyncio
import json
import random
import uuid

import pytest
from e2e_harness import TraceProcs

from trace_lite.pg_queue import PgQueue


async def _send(db_url: str, bodies: list[bytes]) -> None:
    queue = PgQueue(db_url, "tasks")
    try:
        for i in range(0, len(bodies), 200):
            await queue.send(bodies[i : i + 200])
    finally:
        await queue.close()


def _wake(task_id: str) -> bytes:
    return json.dumps({"task_id": task_id}).encode()


# a long lease: a second attempt here can only come from a duplicate wake-up, not from a
# heartbeat delayed on a loaded machine
@pytest.mark.trace_lease(15)
def test_duplicate_and_reordered_wakeups_run_each_task_once(trace_procs: TraceProcs) -> None:
    t = trace_procs
    rng = random.Random(7)
    t.start_dispatcher()
    t.start_worker(concurrency=8)
    t.start_worker(concurrency=8)

    ids = t.create_tasks([{"operator": "emit_events", "payload": {"n": 2}} for _ in range(200)])
    # While the workers run: 3 extra copies of every wake-up, shuffled, in several sends,
    # plus junk that must be consumed without harm.
    junk = [
        _wake(str(uuid.uuid4())),
        _wake("not-a-uuid"),
        b"not json",
        b"{}",
        b"[1]",
        json.dumps({"task_id": None}).encode(),
        b'{"task_id": 42}',
    ]
    bodies = [_wake(i) for i in ids for _ in range(3)] + junk
    rng.shuffle(bodies)
    asyncio.run(_send(t.db_url, bodies))

    states = t.wait_terminal(ids, timeout=90)
    assert states == {"completed": 200}, states
    # once everything completed, another round of duplicates for finished tasks
    late = [_wake(i) for i in rng.sample(ids, 50) for _ in range(2)]
    rng.shuffle(late)
    asyncio.run(_send(t.db_url, late))
    t.wait_until(
        lambda: t.scalar("SELECT count(*) FROM queue_messages WHERE NOT dead") == 0,
        60,
        "every wake-up (duplicates and junk included) to be consumed",
    )

    assert t.sql(
        "SELECT count(*) FROM task_attempts WHERE NOT (task_id = ANY(%s::uuid[]))", (ids,)
    ) == [(0,)]
    per_task = dict(
        t.sql(
            "SELECT t.task_id::text, count(a.*) FROM tasks t LEFT JOIN task_attempts a USING "
            "(task_id) GROUP BY t.task_id"
        )
    )
    assert len(per_task) == 200
    multi = {k: v for k, v in per_task.items() if v != 1}
    assert not multi, f"tasks with more than one attempt: {multi}"
    assert t.scalar("SELECT count(*) FROM task_attempts WHERE outcome <> 'succeeded'") == 0
    events = dict(
        t.sql(
            "SELECT task_id::text, array_agg(event_key ORDER BY event_key) "
            "FROM task_events GROUP BY task_id"
        )
    )
    assert len(events) == 200
    bad = {k: v for k, v in events.items() if v != ["done", "progress-0", "progress-1"]}
    assert not bad, f"unexpected events: {list(bad.items())[:5]}"
    assert t.scalar("SELECT count(*) FROM task_events WHERE attempt <> 1") == 0
    # the poison wake-ups were dead-lettered (a well-formed one for an unknown task is merely
    # acknowledged), and the workers are still up
    dead = sorted(bytes(b) for (b,) in t.sql("SELECT body FROM queue_messages WHERE dead"))
    assert dead == sorted(j for j in junk if j != junk[0])
    assert len(t.live("worker")) == 2 and len(t.live("dispatcher")) == 1, t.log_tails()


def test_poison_wakeups_are_dead_lettered_and_the_rest_of_the_receive_runs(
    trace_procs: TraceProcs,
) -> None:
    t = trace_procs
    t.start_dispatcher()
    ids = t.create_tasks([{"operator": "noop"} for _ in range(6)])
    t.wait_until(
        lambda: t.scalar("SELECT count(*) FROM queue_messages") == 6,
        30,
        "the creation wake-ups to be published",
    )
    t.sql("DELETE FROM queue_messages")  # from here on, the only wake-ups are the ones below
    poison = {
        b"not json": "body is not JSON",
        _wake("not-a-uuid"): "task_id is not a UUID: 'not-a-uuid'",
        json.dumps({"task_id": None}).encode(): "task_id is not a UUID string (got NoneType)",
        b'{"task_id": 123}': "task_id is not a UUID string (got int)",
    }
    spellings = [
        ids[0].upper(),
        "{" + ids[1] + "}",
        ids[2].replace("-", ""),
        "{" + ids[3].upper().replace("-", "") + "}",
        ids[4],
        ids[5],
    ]
    # ten messages in one send: the worker's first receive (up to 10) gets all of them
    asyncio.run(_send(t.db_url, [*poison, *(_wake(s) for s in spellings)]))
    t.start_worker(concurrency=16)

    assert t.wait_terminal(ids, timeout=60) == {"completed": 6}
    # each task completed from the wake-ups above: none needed the reaper's re-wake, which
    # would have written a second wake-up to the outbox
    rewakes = t.sql(
        "SELECT payload->>'task_id', count(*) FROM outbox WHERE topic = 'wake' "
        "GROUP BY 1 HAVING count(*) > 1"
    )
    assert rewakes == []
    t.wait_until(
        lambda: t.scalar("SELECT count(*) FROM queue_messages WHERE NOT dead") == 0,
        30,
        "the valid wake-ups to be acknowledged",
    )
    dead = {
        bytes(body): reason
        for body, reason in t.sql("SELECT body, dead_reason FROM queue_messages WHERE dead")
    }
    assert dead == poison
    assert t.scalar("SELECT max(receive_count) FROM queue_messages WHERE dead") == 1
    [worker] = t.live("worker")
    assert worker.alive(), worker.tail()
