"""The worker against the in-process Dispatcher (``InProcessTaskSurface``) on real Postgres:
the same worker code as over HTTP, with no HTTP server and no subprocess."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from trace_core import wire
from trace_core.lifecycle import RetryPolicy
from trace_core.testing import MemoryObjectStore, MemoryQueue, MemorySigner
from trace_lite.dispatcher import Dispatcher, open_pool
from trace_lite.task_surface import InProcessTaskSurface
from trace_sdk import BUILTIN_OPERATORS, Worker


@pytest.fixture
async def dispatcher(db_url: str) -> AsyncIterator[Dispatcher]:
    pool = await open_pool(db_url, min_size=1, max_size=8)
    try:
        yield Dispatcher(
            pool,
            signer=MemorySigner(),
            queue=MemoryQueue("tasks"),
            object_store=MemoryObjectStore(),
            retry=RetryPolicy(max_attempts=3, base_s=0.0),
            rand=lambda: 0.5,
        )
    finally:
        await pool.close()


async def test_worker_runs_tasks_through_the_in_process_dispatcher(dispatcher: Dispatcher) -> None:
    assert dispatcher.queue is not None and dispatcher.object_store is not None
    surface = InProcessTaskSurface(dispatcher)
    worker = Worker(
        surface=surface,
        queue=dispatcher.queue,
        operators=dict(BUILTIN_OPERATORS),
        store=dispatcher.object_store,
        wait_s=0.2,
    )
    infos = await dispatcher.create_tasks(
        [
            wire.CreateTaskRequest(operator="emit_events", payload={"n": 2}),
            wire.CreateTaskRequest(operator="demo", payload={"events": 1, "rows": 3}),
            wire.CreateTaskRequest(operator="fail_first_attempt"),
            wire.CreateTaskRequest(operator="fail_always", payload={"fatal": True}),
        ]
    )
    ids = [i.task_id for i in infos]
    stop = asyncio.Event()
    background = asyncio.create_task(dispatcher.run_background(stop, reap_every_s=0.05))
    running = asyncio.create_task(worker.run(stop))
    try:
        async with asyncio.timeout(60):
            while True:
                states = [(await dispatcher.get_task(t))["state"] for t in ids]
                if all(s in ("completed", "failed") for s in states):
                    break
                await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.gather(background, running)
        await surface.close()
    assert states == ["completed", "completed", "completed", "failed"]
    retried = await dispatcher.get_task(ids[2])
    assert retried["attempt"] == 2
    assert worker.stats["succeeded"] == 3 and worker.stats["failed"] == 2
    # the demo's buffer batch went through the store and the buffer-publish call
    objects = await dispatcher.object_store.list("")
    assert any(o.key.endswith("buffer/demo_rows/rows.jsonl") for o in objects)
