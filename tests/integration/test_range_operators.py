"""``range_splitter`` and ``range_aggregator`` run by the worker through the in-process
Dispatcher on real Postgres, the aggregator's state in ``operator_state``
(``trace_lite.operator_state.PgOperatorState``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import attrs
import pytest

from trace_core import errors, wire
from trace_core.lifecycle import RetryPolicy
from trace_core.testing import MemoryObjectStore, MemoryQueue, MemorySigner
from trace_lite.dispatcher import Dispatcher, open_pool
from trace_lite.operator_state import PgOperatorState
from trace_lite.task_surface import InProcessTaskSurface
from trace_sdk import BUILTIN_OPERATORS, Worker
from trace_sdk.ranges import make_range_aggregator

DONE = ("completed", "failed")


@attrs.define
class Env:
    d: Dispatcher
    state: PgOperatorState

    async def run(self, operator: str, payload: dict[str, Any], attempts: int = 3) -> Any:
        (info,) = await self.d.create_tasks(
            [wire.CreateTaskRequest(operator=operator, payload=payload, max_attempts=attempts)]
        )
        assert self.d.queue is not None
        surface = InProcessTaskSurface(self.d)
        operators = {**BUILTIN_OPERATORS, "range_aggregator": make_range_aggregator(self.state)}
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
        return task

    async def aggregate(
        self, start: int, end: int, attempts: int = 3, producer: str | None = None
    ) -> Any:
        """One aggregator task for the range event [start, end) (of task ``producer``)."""
        event: dict[str, Any] = {
            "key": f"r{start}",
            "type": "range",
            "payload": {"start": start, "end": end},
        }
        if producer:
            event["producer_task_id"] = producer
        return await self.run(
            "range_aggregator",
            {"blocks": 100, "state_key": "agg", "event": event},
            attempts,
        )


def windows(task: dict[str, Any]) -> list[str]:
    return [e["event_key"] for e in task["events"]]


@pytest.fixture
async def env(db_url: str) -> AsyncIterator[Env]:
    pool = await open_pool(db_url, min_size=1, max_size=8)
    try:
        yield Env(
            Dispatcher(
                pool,
                signer=MemorySigner(),
                queue=MemoryQueue("tasks"),
                object_store=MemoryObjectStore(),
                retry=RetryPolicy(max_attempts=3, base_s=0.0),
                rand=lambda: 0.5,
            ),
            PgOperatorState(pool),
        )
    finally:
        await pool.close()


async def test_the_splitter_announces_aligned_windows(env: Env) -> None:
    task = await env.run("range_splitter", {"blocks": 100, "start": 50, "end": 320})
    assert task["state"] == "completed"
    assert windows(task) == ["window:50_100", "window:100_200", "window:200_300", "window:300_320"]
    assert [e["payload"] for e in task["events"]][1] == {
        "start": 100,
        "end": 200,
        "partition_key": "100_200",
    }


async def test_the_aggregator_folds_ordered_ranges_durably(env: Env) -> None:
    assert windows(await env.aggregate(0, 60)) == []
    assert windows(await env.aggregate(60, 130)) == ["window:0_100"]
    assert windows(await env.aggregate(130, 320)) == ["window:100_200", "window:200_300"]
    # an older range again (its data committed again): the announced window holding it again
    replay = await env.aggregate(0, 60)
    assert replay["state"] == "completed" and windows(replay) == ["window:0_100"]
    # a gap: the task fails retryably (it waits through its retries), the state does not move
    gap = await env.aggregate(400, 500, attempts=2)
    assert gap["state"] == "failed" and len(gap["attempts"]) == 2
    assert "waiting for [320, 400)" in str(gap["attempts"][-1]["error"])
    assert windows(await env.aggregate(320, 400)) == ["window:300_400"]
    assert windows(await env.aggregate(400, 500)) == ["window:400_500"]
    # a partial overlap fails for good, at once
    overlap = await env.aggregate(450, 550)
    assert overlap["state"] == "failed" and len(overlap["attempts"]) == 1
    # another job's state is its own
    other = await env.run(
        "range_aggregator",
        {"blocks": 100, "state_key": "other", "start": 0, "end": 100},
    )
    assert windows(other) == ["window:0_100"]


async def test_a_range_committed_again_reannounces_its_window_once_per_commit(env: Env) -> None:
    """A reorged range re-extracted (``replace``) reaches the aggregator as a range below its
    prefix: the window built from it is announced again, once per committing task."""
    for at in range(0, 300, 50):
        await env.aggregate(at, at + 50, producer=f"ingest-{at}")
    first = await env.aggregate(100, 150, producer="reextract-1")
    assert windows(first) == ["window:100_200"]
    # another chunk of the same re-extract in the same window: nothing more
    assert windows(await env.aggregate(150, 200, producer="reextract-1")) == []
    # a second re-extract of it: the window again; a re-extract in another window: that one
    assert windows(await env.aggregate(150, 200, producer="reextract-2")) == ["window:100_200"]
    assert windows(await env.aggregate(250, 300, producer="reextract-3")) == ["window:200_300"]
    # fresh input still follows the ordering rules
    assert windows(await env.aggregate(300, 400, producer="ingest-300")) == ["window:300_400"]


async def test_state_writes_are_fenced_and_compare_and_swap(env: Env) -> None:
    (info,) = await env.d.create_tasks(
        [wire.CreateTaskRequest(operator="noop", payload={"state_key": "k"})]
    )
    claim = await env.d.claim(info.task_id)
    assert await env.state.load(info.task_id, claim.attempt) == (None, 0)
    assert await env.state.save(info.task_id, claim.attempt, {"next": 1}, 0) == 1
    with pytest.raises(errors.Conflict):  # a second writer over the same version loses
        await env.state.save(info.task_id, claim.attempt, {"next": 2}, 0)
    assert await env.state.load(info.task_id, claim.attempt) == ({"next": 1}, 1)
    with pytest.raises(errors.LeaseLost):  # not the running attempt
        await env.state.load(info.task_id, claim.attempt + 1)
    with pytest.raises(errors.NotFound):  # an input dataset the org does not have
        await env.state.load(info.task_id, claim.attempt, "nope")
    (keyless,) = await env.d.create_tasks([wire.CreateTaskRequest(operator="noop")])
    keyless_claim = await env.d.claim(keyless.task_id)
    with pytest.raises(errors.ValidationFailed):
        await env.state.load(keyless.task_id, keyless_claim.attempt)
