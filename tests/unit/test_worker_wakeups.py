"""The worker's handling of wake-ups, against the fake task surface (memory queue, manual
clock; no HTTP, no subprocess): claim failures, refusals, poison wake-ups."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

from trace_core import errors, wire
from trace_core.testing import FakeTaskSurface, ManualClock, MemoryQueue, TaskCall
from trace_sdk import Worker, parse_wakeup

TASK = "6b0c6a2e-7f1e-4e55-9e8f-1a2b3c4d5e6f"


def down(call: TaskCall) -> Any:
    raise errors.Unavailable("dispatcher down")


def refusing(code: str) -> Any:
    def handler(call: TaskCall) -> wire.ClaimBatchResponse:
        return wire.ClaimBatchResponse(
            claims=[], refused=[wire.ClaimRefusal(t, code, "no") for t in call.request.task_ids]
        )

    return handler


async def _received(queue: MemoryQueue, *bodies: bytes) -> list[Any]:
    await queue.send(list(bodies) or [json.dumps({"task_id": TASK}).encode()])
    return await queue.receive(max_messages=10, visibility_timeout=30)


async def test_transient_claim_failure_makes_the_wakeup_reappear_soon() -> None:
    clock = ManualClock()
    queue = MemoryQueue("tasks", clock=clock)
    worker = Worker(surface=FakeTaskSurface(down), queue=queue, operators={})
    await worker._claim_and_start(await _received(queue))
    clock.advance(1.6)  # retry_after_s=1.0 with jitter in [0.5, 1.5): visible again
    again = await queue.receive(max_messages=10)
    assert len(again) == 1 and again[0].receive_count == 2


async def test_locked_row_refusal_retries_soon_but_final_refusals_ack() -> None:
    clock = ManualClock()
    queue = MemoryQueue("tasks", clock=clock)
    worker = Worker(surface=FakeTaskSurface(refusing("unavailable")), queue=queue, operators={})
    await worker._claim_and_start(await _received(queue))
    clock.advance(1.6)
    assert len(await queue.receive(max_messages=10)) == 1

    for code in ("task_not_claimable", "task_canceled", "not_found"):
        queue2 = MemoryQueue("tasks", clock=ManualClock())
        worker2 = Worker(surface=FakeTaskSurface(refusing(code)), queue=queue2, operators={})
        await worker2._claim_and_start(await _received(queue2))
        await worker2._acks.close()
        assert await queue2.depth() == 0, code  # acknowledged: a useless wake-up is dropped


async def test_poison_wakeups_are_dead_lettered_and_the_rest_is_claimed() -> None:
    queue = MemoryQueue("tasks", clock=ManualClock())
    surface = FakeTaskSurface(refusing("task_not_claimable"))
    worker = Worker(surface=surface, queue=queue, operators={})
    poison = [b"not json", b'{"task_id": "not-a-uuid"}', b'{"task_id": null}', b'{"task_id": 123}']
    valid = json.dumps({"task_id": "{" + TASK.upper() + "}"}).encode()
    await worker._claim_and_start(await _received(queue, *poison, valid))
    [claim] = surface.calls
    assert claim.request.task_ids == [TASK]  # only the valid one, in canonical form
    dead = {m.body: m.dead_letter_reason for m in await queue.dead_letters()}
    assert set(dead) == set(poison)
    assert all(dead.values())
    assert worker.stats["dead_lettered"] == 4


async def test_a_claim_refused_as_invalid_is_retried_one_by_one() -> None:
    other = "00000000-0000-4000-8000-000000000001"

    def handler(call: TaskCall) -> wire.ClaimBatchResponse:
        if TASK in call.request.task_ids:
            raise errors.ValidationFailed("the Dispatcher refuses this one", field="task_ids[0]")
        return wire.ClaimBatchResponse(
            claims=[],
            refused=[wire.ClaimRefusal(t, "not_found", "") for t in call.request.task_ids],
        )

    queue = MemoryQueue("tasks", clock=ManualClock())
    worker = Worker(surface=FakeTaskSurface(handler), queue=queue, operators={})
    bodies = [json.dumps({"task_id": t}).encode() for t in (TASK, other)]
    await worker._claim_and_start(await _received(queue, *bodies))
    await worker._acks.close()
    [dead] = await queue.dead_letters()
    assert dead.body == bodies[0] and "claim refused" in (dead.dead_letter_reason or "")
    assert await queue.depth() == 0  # the other one was claimed alone and acknowledged


def test_parse_wakeup_normalises_uuid_spellings_and_names_the_problem() -> None:
    for spelling in (TASK, TASK.upper(), "{" + TASK + "}", TASK.replace("-", "")):
        assert parse_wakeup(json.dumps({"task_id": spelling}).encode()) == (TASK, "")
    assert parse_wakeup(b"\xff\xfe") == (None, "body is not JSON")
    assert parse_wakeup(b"[1]")[0] is None
    assert parse_wakeup(b"{}")[0] is None
    assert parse_wakeup(b'{"task_id": "x"}') == (None, "task_id is not a UUID: 'x'")


async def test_an_ack_after_shutdown_is_dropped_not_raised() -> None:
    queue = MemoryQueue("tasks", clock=ManualClock())
    worker = Worker(surface=FakeTaskSurface(down), queue=queue, operators={})
    [message] = await _received(queue)
    await worker._acks.close()
    worker._delete(message)  # an attempt that ends after the drain must not crash on its ack
    assert await queue.depth() == 1  # the wake-up stays; it reappears and is skipped then


async def test_wakeups_received_during_a_claim_go_together_into_the_next_claim() -> None:
    """Claims run in the background like a group commit: while the first claim (one receive,
    10 wake-ups) is in flight the worker keeps receiving, and the next claim carries all 30
    wake-ups received meanwhile. Wake-ups waiting for a claim count against ``concurrency``."""
    sizes: list[int] = []
    worker: Worker

    async def handler(call: TaskCall) -> wire.ClaimBatchResponse:
        sizes.append(len(call.request.task_ids))
        if len(sizes) == 1:
            # A worker that claims before receiving again never gets here with 40 received.
            for _ in range(1000):
                if worker.stats["received"] == 40:
                    break
                await asyncio.sleep(0.01)
        return wire.ClaimBatchResponse(
            claims=[],
            refused=[wire.ClaimRefusal(t, "not_found", "") for t in call.request.task_ids],
        )

    queue = MemoryQueue("tasks")
    await queue.send([json.dumps({"task_id": str(uuid.uuid4())}).encode() for _ in range(45)])
    worker = Worker(
        surface=FakeTaskSurface(handler), queue=queue, operators={}, concurrency=40, wait_s=0.05
    )
    stop = asyncio.Event()
    run = asyncio.create_task(worker.run(stop))
    for _ in range(1000):
        if await queue.depth() == 0:
            break
        await asyncio.sleep(0.01)
    stop.set()
    await asyncio.wait_for(run, timeout=10)
    # 10 from the first receive; 30 more received during that claim (the concurrency bound
    # stops the receives at 40 wake-ups waiting); the last 5 once the claims freed room.
    assert sizes == [10, 30, 5]
    assert worker.stats["skipped"] == 45 and await queue.depth() == 0


async def test_a_full_worker_waits_for_an_attempt_without_spinning(monkeypatch: Any) -> None:
    """At its concurrency, with its last claim finished, the worker's loop sleeps until an
    attempt ends (it once spun on the finished claim, a CPU core per worker)."""
    worker = Worker(
        surface=FakeTaskSurface(down), queue=MemoryQueue("tasks"), operators={}, concurrency=1
    )
    attempt: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    worker._inflight.add(attempt)  # type: ignore[arg-type]
    worker._claimer = asyncio.create_task(asyncio.sleep(0))  # a claim that has finished
    await worker._claimer
    calls = 0
    real_wait = asyncio.wait

    async def counting_wait(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return await real_wait(*args, **kwargs)

    monkeypatch.setattr(asyncio, "wait", counting_wait)
    stop = asyncio.Event()
    running = asyncio.create_task(worker.run(stop))
    for _ in range(50):
        await asyncio.sleep(0)
    stop.set()
    attempt.set_result(None)
    await running
    assert calls <= 3  # one wait for the attempt, the stop and the drain; not one per loop
