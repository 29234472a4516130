"""A pooled attempt that runs past its ``timeout`` gives its slot back, on real Postgres.

The worker holding the slot keeps heartbeating, so its lease never lapses on its own: the
kernel caps every lease at the attempt's ``timeout_s``, the reaper's ``timed_out`` path
(``lifecycle.decide_expire``, ``TIME_OUT``) ends the attempt, and in that same transaction the
slot frees and the oldest task waiting for the pool is woken (``trace_lite.pool_slots``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from pg_sql import sql
from trace_core import errors, wire
from trace_core.lifecycle import RetryPolicy
from trace_core.testing import MemoryObjectStore, MemoryQueue, MemorySigner
from trace_lite.dag_runs import DagRuns
from trace_lite.dags import Dags
from trace_lite.dispatcher import Dispatcher, open_pool
from trace_servers.dag_cli import builtin_operators

ORG = "acme"


def _flow(max_attempts: int) -> dict[str, Any]:
    return {
        "name": "pooled",
        "worker_pools": {"rpc": [{"env": {"CHAIN": "a"}}, {"env": {"CHAIN": "b"}}]},
        "jobs": {
            "fetch": {
                "operator": "noop",
                "triggers": [{"type": "manual"}],
                "worker_pool": "rpc",
                "timeout": "1s",
                "max_attempts": max_attempts,
            },
        },
    }


def _held_slots(db_url: str) -> list[int]:
    rows = sql(
        db_url,
        "SELECT l.slot FROM pool_slot_leases l JOIN task_attempts a "
        "ON (a.task_id, a.attempt) = (l.task_id, l.attempt) AND a.outcome = 'running' "
        "ORDER BY l.slot",
    )
    return [r[0] for r in rows]


@pytest.fixture
async def dispatcher(db_url: str) -> AsyncIterator[Dispatcher]:
    pool = await open_pool(db_url, min_size=2, max_size=8)
    d = Dispatcher(
        pool,
        signer=MemorySigner(),
        queue=MemoryQueue("tasks"),
        object_store=MemoryObjectStore(),
        retry=RetryPolicy(max_attempts=3, base_s=0.0),
        rand=lambda: 0.5,
    )
    try:
        yield d
    finally:
        await pool.close()


@pytest.mark.parametrize(
    ("max_attempts", "ended"),
    [(1, "failed"), (2, "queued")],  # a retry with base_s 0 is due in the same pass
    ids=["last", "retried"],
)
async def test_a_timed_out_attempt_frees_its_slot(
    dispatcher: Dispatcher, db_url: str, max_attempts: int, ended: str
) -> None:
    d = dispatcher
    await Dags(d.pool, operators=builtin_operators()).deploy(None, ORG, _flow(max_attempts))
    runs = DagRuns(d.pool)
    ids = [str((await runs.trigger(None, ORG, "pooled", "fetch"))["task_id"]) for _ in range(3)]
    grants = [c for t in ids for c in (await d.claim_many([t])).claims]
    assert sorted(g.task.slot.index for g in grants if g.task.slot) == [0, 1]
    (waiting,) = [t for t in ids if t not in {g.claim.task_id for g in grants}]
    assert (await d.claim_many([waiting])).claims == []  # the pool is full
    wakes = sql(db_url, "SELECT count(*) FROM outbox WHERE topic = 'wake'")[0][0]

    # the workers stay alive and heartbeat; only the time budget runs out
    beating = list(grants)
    expired = 0
    async with asyncio.timeout(30):
        while expired < len(grants):
            for g in list(beating):
                fence = {
                    "task_id": g.claim.task_id,
                    "attempt": g.claim.attempt,
                    "lease_token": g.claim.lease_token,
                }
                try:
                    await d.heartbeat(wire.HeartbeatRequest(**fence))
                except errors.LeaseLost:  # the reaper ended the attempt
                    beating.remove(g)
            expired += (await d.reap_once()).expired
            await asyncio.sleep(0.1)
    assert all(g.task.timeout_s == 1 for g in grants)

    rows = sql(
        db_url,
        "SELECT a.outcome, t.state, t.error ->> 'code', t.error ->> 'message' "
        "FROM task_attempts a JOIN tasks t USING (task_id) "
        "WHERE a.task_id = ANY(%s::uuid[]) AND a.attempt = 1",
        [[g.claim.task_id for g in grants]],
    )
    assert len(rows) == 2
    for outcome, state, code, message in rows:
        assert (outcome, state, code) == ("timed_out", ended, "timed_out")
        assert "ran past the task's timeout_s (1 s)" in message  # the timeout, not the lease
    assert _held_slots(db_url) == []  # both slots came back
    # the reaper's transaction woke the task waiting for the pool
    woken = sql(
        db_url,
        "SELECT payload ->> 'task_id' FROM outbox WHERE topic = 'wake' ORDER BY id OFFSET %s",
        [wakes],
    )
    assert (waiting,) in woken
    g = (await d.claim_many([waiting])).claims[0]
    assert g.task.slot is not None and g.task.slot.index in (0, 1)
    assert _held_slots(db_url) == [g.task.slot.index]
