"""``chain_follower`` against a real anvil node, run by the worker through the in-process
Dispatcher on real Postgres, its cursor in ``operator_state`` (``PgOperatorState``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import attrs
import pytest

from trace_core import wire
from trace_core.lifecycle import RetryPolicy
from trace_core.testing import MemoryQueue, MemorySigner
from trace_lite.chain.devnode import DevNode, mine_empty
from trace_lite.dispatcher import Dispatcher, open_pool
from trace_lite.operator_state import PgOperatorState
from trace_lite.task_surface import InProcessTaskSurface
from trace_sdk import Worker
from trace_sdk.block_hashes import hex_hashes_digest
from trace_sdk.follower import (
    CommittedBlocks,
    CommittedRange,
    FollowerStore,
    make_head_follower,
    plan,
)

DONE = ("completed", "failed")


class CrashAfterSave:
    """The operator-state store, except that the next ``crashes`` saves raise after the write
    committed: a worker dying between the cursor write and the completion."""

    def __init__(self, inner: PgOperatorState, crashes: int) -> None:
        self.inner = inner
        self.crashes = crashes

    async def load(self, *args: Any) -> Any:
        return await self.inner.load(*args)

    async def writer_state(self, *args: Any) -> Any:
        return await self.inner.writer_state(*args)

    async def save(self, *args: Any) -> int:
        version = await self.inner.save(*args)
        if self.crashes > 0:
            self.crashes -= 1
            raise RuntimeError("crashed after the cursor write, before the completion")
        return version


@attrs.define
class Env:
    d: Dispatcher
    state: PgOperatorState
    node: DevNode

    async def follow(
        self,
        store: FollowerStore | None = None,
        attempts: int = 3,
        key: str = "f",
        committed: CommittedBlocks | None = None,
        **config: Any,
    ) -> dict[str, Any]:
        """One follower task (a fresh worker each time: a restart), run to its end."""
        payload = {"chunk": 20, "confirmations": 2, "rpc_url": self.node.url, "state_key": key}
        payload |= config
        (info,) = await self.d.create_tasks(
            [
                wire.CreateTaskRequest(
                    operator="chain_follower", payload=payload, max_attempts=attempts
                )
            ]
        )
        assert self.d.queue is not None
        surface = InProcessTaskSurface(self.d)
        operators = {"chain_follower": make_head_follower(store or self.state, committed)}
        worker = Worker(
            surface=surface, queue=self.d.queue, operators=operators, store=None, wait_s=0.1
        )
        stop = asyncio.Event()
        background = asyncio.create_task(self.d.run_background(stop, reap_every_s=0.05))
        running = asyncio.create_task(worker.run(stop))
        try:
            async with asyncio.timeout(60):
                while (task := await self.d.get_task(info.task_id))["state"] not in DONE:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
        finally:
            stop.set()
            await asyncio.gather(background, running)
            await surface.close()
        result: dict[str, Any] = task
        return result


def announced(task: dict[str, Any]) -> list[str]:
    return [e["event_key"] for e in task["events"]]


def chunks(start: int, end: int) -> list[str]:
    return [f"range:{s}_{s + 20}" for s in range(start, end, 20)]


@pytest.fixture
async def env(db_url: str, fresh_node: DevNode) -> AsyncIterator[Env]:
    pool = await open_pool(db_url, min_size=1, max_size=8)
    try:
        yield Env(
            Dispatcher(
                pool,
                signer=MemorySigner(),
                queue=MemoryQueue("tasks"),
                retry=RetryPolicy(max_attempts=3, base_s=0.0),
                rand=lambda: 0.5,
            ),
            PgOperatorState(pool),
            fresh_node,
        )
    finally:
        await pool.close()


def test_plan_cuts_whole_aligned_chunks_behind_the_confirmations() -> None:
    assert plan(0, 95, chunk=20, confirmations=2, max_ranges=50) == [
        (0, 20),
        (20, 40),
        (40, 60),
        (60, 80),
    ]
    assert plan(80, 101, chunk=20, confirmations=2, max_ranges=50) == []  # 99 < 100
    assert plan(80, 102, chunk=20, confirmations=2, max_ranges=50) == [(80, 100)]
    assert plan(0, 1000, chunk=20, confirmations=0, max_ranges=3) == [(0, 20), (20, 40), (40, 60)]


async def test_the_follower_announces_confirmed_chunks_and_resumes_from_its_cursor(
    env: Env,
) -> None:
    rpc = env.node.rpc()
    mine_empty(rpc, 95)
    first = await env.follow()
    assert first["state"] == "completed"
    assert announced(first) == chunks(0, 80)
    mine_empty(rpc, 30)  # head 125: 80..119 are confirmed whole chunks
    second = await env.follow()  # a new worker: the cursor is durable
    assert announced(second) == chunks(80, 120)
    idle = await env.follow()  # nothing new: no event, no write
    assert idle["state"] == "completed" and announced(idle) == []
    # another job's cursor is its own
    other = await env.follow(key="other")
    assert announced(other) == chunks(0, 120)


async def test_a_crash_between_the_cursor_write_and_the_completion_loses_and_repeats_nothing(
    env: Env,
) -> None:
    rpc = env.node.rpc()
    mine_empty(rpc, 62)  # head 62: 0..59
    # attempt 1 moves the cursor and dies before completing; attempt 2 announces those ranges
    retried = await env.follow(CrashAfterSave(env.state, crashes=1))
    assert retried["state"] == "completed" and len(retried["attempts"]) == 2
    assert announced(retried) == chunks(0, 60)
    mine_empty(rpc, 40)  # head 102
    # a task that moves the cursor and then fails for good: its ranges were never announced
    lost = await env.follow(CrashAfterSave(env.state, crashes=5), attempts=1)
    assert lost["state"] == "failed" and announced(lost) == []
    mine_empty(rpc, 20)  # head 122
    # the next task carries them, then its own
    carried = await env.follow()
    assert announced(carried) == chunks(60, 120)
    everything = announced(retried) + announced(lost) + announced(carried)
    assert sorted(everything) == sorted(chunks(0, 120))  # every range exactly once


@attrs.define
class Committed:
    """What the test says the DAG committed: ``(start, end)`` -> (partition id, digest)."""

    ranges: dict[tuple[int, int], tuple[int, str | None]] = attrs.field(factory=dict)

    async def committed(
        self, task_id: str, attempt: int, dataset: str, low: int, high: int
    ) -> list[CommittedRange]:
        return [
            CommittedRange(s, e, p, d)
            for (s, e), (p, d) in sorted(self.ranges.items())
            if s >= low and e <= high
        ]


async def test_a_range_committed_after_it_left_the_window_is_still_checked(env: Env) -> None:
    rpc = env.node.rpc()
    mine_empty(rpc, 102)  # head 102: 0..99 announced, cursor 100
    store = Committed()
    config = {"verify": "blocks", "reorg_window": 20}
    first = await env.follow(committed=store, **config)
    assert announced(first) == chunks(0, 100)

    def digest(start: int, end: int) -> str:
        return hex_hashes_digest(
            rpc.call("eth_getBlockByNumber", hex(b), False)["hash"] for b in range(start, end)
        )

    # the ingest lagged: 0_20 and 20_40 commit only now, far below the 20-block window, 0_20
    # from another fork
    store.ranges[(0, 20)] = (1, digest(20, 40))
    store.ranges[(20, 40)] = (2, digest(20, 40))
    mine_empty(rpc, 20)  # head 122
    second = await env.follow(committed=store, **config)
    assert announced(second) == ["reorg:0_20", "range:100_120"]
    assert second["result"]["stale"] == 1
    # its re-extract has not committed yet (the same partition is live): not announced again
    assert announced(await env.follow(committed=store, **config)) == []
    store.ranges[(0, 20)] = (3, digest(0, 20))  # the re-extract committed the node's blocks
    assert announced(await env.follow(committed=store, **config)) == []
    store.ranges[(40, 60)] = (4, digest(60, 80))  # a later commit is checked all the same
    assert announced(await env.follow(committed=store, **config)) == ["reorg:40_60"]
