"""Worker pools on real Postgres: a pooled DAG job's attempt starts only holding a free slot of
its pool, concurrent claims never hold more slots than exist (nor more than max_concurrency),
a slot comes back on every ending (completion, failure, cancel, lease expiry through the
reaper), and each attempt sees only its own slot's env and secrets, never stored in task rows."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import attrs
import pytest

from pg_sql import sql
from trace_core import errors, wire
from trace_core.lifecycle import RetryPolicy
from trace_core.testing import MemoryObjectStore, MemoryQueue, MemorySigner
from trace_core.testing.memory_secrets import MemorySecretStore
from trace_lite.dag_runs import DagRuns
from trace_lite.dags import Dags
from trace_lite.dispatcher import Dispatcher, open_pool
from trace_lite.task_surface import InProcessTaskSurface
from trace_sdk import Worker
from trace_sdk._worker import TaskContext
from trace_servers.dag_cli import builtin_operators

ORG = "acme"
SLOTS = [
    {"env": {"CHAIN": "a"}, "secret_env": {"RPC_API_KEY": "rpc/key-a"}},
    {"env": {"CHAIN": "b"}, "secret_env": {"RPC_API_KEY": "rpc/key-b"}},
]


def _flow(max_concurrency: int) -> dict[str, Any]:
    return {
        "name": "pooled",
        "worker_pools": {"rpc": SLOTS},
        "jobs": {
            "fetch": {
                "operator": "noop",
                "triggers": [{"type": "manual"}],
                "worker_pool": "rpc",
                "scaling": {"max_concurrency": max_concurrency},
            },
        },
    }


@attrs.define
class World:
    d: Dispatcher
    dags: Dags
    runs: DagRuns
    db_url: str

    def sql(self, query: str, params: Any = None) -> list[tuple[Any, ...]]:
        return sql(self.db_url, query, params)

    async def trigger(self, n: int) -> list[str]:
        return [
            str((await self.runs.trigger(None, ORG, "pooled", "fetch"))["task_id"])
            for _ in range(n)
        ]

    def running_slots(self) -> list[int]:
        rows = self.sql(
            "SELECT l.slot FROM pool_slot_leases l JOIN task_attempts a "
            "ON (a.task_id, a.attempt) = (l.task_id, l.attempt) AND a.outcome = 'running' "
            "ORDER BY l.slot"
        )
        return [r[0] for r in rows]


@pytest.fixture
async def world(db_url: str) -> AsyncIterator[World]:
    pool = await open_pool(db_url, min_size=2, max_size=16)
    d = Dispatcher(
        pool,
        signer=MemorySigner(),
        queue=MemoryQueue("tasks"),
        object_store=MemoryObjectStore(),
        retry=RetryPolicy(max_attempts=3, base_s=0.0),
        rand=lambda: 0.5,
    )
    dags = Dags(pool, operators=builtin_operators())
    await dags.deploy(None, ORG, _flow(3))  # effective concurrency min(3, 2 slots) = 2
    try:
        yield World(d, dags, DagRuns(pool), db_url)
    finally:
        await pool.close()


async def _claim_all(w: World, ids: list[str]) -> wire.ClaimBatchResponse:
    """Claim each task in its own concurrent transaction; the answers merged."""
    answers = await asyncio.gather(*(w.d.claim_many([t]) for t in ids))
    return wire.ClaimBatchResponse(
        claims=[c for a in answers for c in a.claims],
        refused=[r for a in answers for r in a.refused],
    )


def _fence(g: wire.ClaimGrantOut) -> dict[str, Any]:
    return {
        "task_id": g.claim.task_id,
        "attempt": g.claim.attempt,
        "lease_token": g.claim.lease_token,
    }


async def test_concurrent_claims_never_exceed_the_slots(world: World) -> None:
    ids = await world.trigger(8)
    batch = await _claim_all(world, ids)
    assert sorted(g.task.slot.index for g in batch.claims if g.task.slot) == [0, 1]
    assert world.running_slots() == [0, 1]
    # refused as not claimable: the wake-up is dropped, a freed slot wakes a waiting task
    assert len(batch.refused) == 6
    assert {r.error for r in batch.refused} == {"task_not_claimable"}
    # again, with nothing ended: nothing more starts, the others stay queued
    rest = [t for t in ids if t not in {g.claim.task_id for g in batch.claims}]
    again = await _claim_all(world, rest)
    assert again.claims == [] and len(again.refused) == 6
    assert world.running_slots() == [0, 1]
    assert world.sql("SELECT state, count(*) FROM tasks GROUP BY state ORDER BY state") == [
        ("queued", 6),
        ("running", 2),
    ]


async def test_slot_payload_and_every_ending_releases(world: World) -> None:
    ids = await world.trigger(6)
    batch = await _claim_all(world, ids)
    assert len(batch.claims) == 2
    by_slot = {g.task.slot.index: g for g in batch.claims if g.task.slot is not None}
    assert set(by_slot) == {0, 1}
    assert by_slot[0].task.slot == wire.SlotOut(
        "rpc", 0, {"CHAIN": "a"}, {"RPC_API_KEY": "rpc/key-a"}
    )
    fetched = await world.d.fetch(by_slot[1].claim.task_id, by_slot[1].claim.attempt)
    assert fetched.slot == by_slot[1].task.slot
    waiting = [t for t in ids if t not in {g.claim.task_id for g in batch.claims}]
    with pytest.raises(errors.TaskNotClaimable):
        await world.d.claim(waiting[0])
    assert (await world.d.get_task(waiting[0]))["state"] == "queued"

    async def next_claim() -> wire.ClaimGrantOut:
        got = await _claim_all(world, waiting)
        assert len(got.claims) == 1, got.refused
        waiting.remove(got.claims[0].claim.task_id)
        return got.claims[0]

    # completion frees the slot, and the freed slot wakes the oldest waiting task at once
    wakes = world.sql("SELECT count(*) FROM outbox WHERE topic = 'wake'")[0][0]
    await world.d.complete(wire.CompleteRequest(**_fence(by_slot[0])))
    assert world.sql(
        "SELECT payload ->> 'task_id' FROM outbox WHERE topic = 'wake' ORDER BY id OFFSET %s",
        [wakes],
    ) == [(waiting[0],)]
    g = await next_claim()
    assert g.task.slot is not None and g.task.slot.index == 0
    # a retryable failure frees it (the task goes back to queued)
    await world.d.complete(
        wire.CompleteRequest(**_fence(g), outcome="failed", error={"code": "x", "message": "x"})
    )
    g = await next_claim()
    # cancel: the slot stays held while the canceled attempt may still run, and comes back
    # once the worker acknowledges the cancel
    await world.d.cancel(g.claim.task_id)
    assert (await _claim_all(world, waiting)).claims == []
    await world.d.complete(wire.CompleteRequest(**_fence(g), outcome="canceled"))
    g = await next_claim()
    # a crashed worker: its lease expires and the reaper ends the attempt, freeing the slot
    world.sql(
        "UPDATE tasks SET lease_expires_at = now() - interval '1 second' WHERE task_id = %s",
        [g.claim.task_id],
    )
    await world.d.reap_once()
    g = await next_claim()
    assert len(world.running_slots()) == 2


async def test_max_concurrency_below_the_slots(world: World) -> None:
    await world.dags.deploy(None, ORG, _flow(1))
    ids = await world.trigger(4)
    batch = await _claim_all(world, ids)
    assert len(batch.claims) == 1
    assert "max_concurrency" in batch.refused[0].message


async def test_each_attempt_sees_only_its_slots_secrets(world: World) -> None:
    secrets = MemorySecretStore()
    (org_id,) = world.sql("SELECT org_id::text FROM orgs WHERE name = %s", [ORG])[0]
    await secrets.put(f"trace/org/{org_id}/rpc/key-a", b"value-of-a")
    await secrets.put(f"trace/org/{org_id}/rpc/key-b", b"value-of-b")
    seen: list[tuple[int, dict[str, str]]] = []
    running = 0
    peak = 0

    async def noop(ctx: TaskContext) -> dict[str, Any]:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        assert ctx.task.slot is not None
        seen.append((ctx.task.slot.index, dict(ctx.env)))
        await asyncio.sleep(0.05)
        running -= 1
        return {}

    assert world.d.queue is not None
    surface = InProcessTaskSurface(world.d)
    worker = Worker(
        surface=surface,
        queue=world.d.queue,
        operators={"noop": noop},
        wait_s=0.1,
        retry_after_s=0.05,
        secrets=secrets,
    )
    ids = await world.trigger(6)
    stop = asyncio.Event()
    background = asyncio.create_task(world.d.run_background(stop, reap_every_s=0.05))
    runner = asyncio.create_task(worker.run(stop))
    try:
        async with asyncio.timeout(60):
            while True:
                states = [(await world.d.get_task(t))["state"] for t in ids]
                if all(s == "completed" for s in states):
                    break
                await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.gather(background, runner)
        await surface.close()
    assert len(seen) == 6 and peak <= 2
    expected = {
        0: {"CHAIN": "a", "RPC_API_KEY": "value-of-a"},
        1: {"CHAIN": "b", "RPC_API_KEY": "value-of-b"},
    }
    assert all(env == expected[index] for index, env in seen)
    # secret values are nowhere in the task rows
    dump = world.sql(
        "SELECT (SELECT string_agg(t::text, '') FROM tasks t) || "
        "(SELECT string_agg(a::text, '') FROM task_attempts a) || "
        "coalesce((SELECT string_agg(e::text, '') FROM task_events e), '')"
    )[0][0]
    assert "value-of" not in dump and "rpc/key-a" not in dump


async def test_a_missing_secret_fails_the_attempt_naming_only_the_secret(world: World) -> None:
    (task_id,) = await world.trigger(1)
    g = (await world.d.claim_many([task_id])).claims[0]
    worker = Worker(
        surface=InProcessTaskSurface(world.d),
        queue=MemoryQueue("x"),
        operators={},
        secrets=MemorySecretStore(),
    )
    with pytest.raises(RuntimeError) as info:
        await worker._slot_env(g.task)
    assert "rpc/key-" in str(info.value) and "RPC_API_KEY" in str(info.value)
