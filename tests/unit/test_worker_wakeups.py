"""The worker wrapper's handling of wake-ups it could not claim (memory queue, manual clock)."""

from __future__ import annotations

from typing import Any

from trace_core import errors, wire
from trace_core.testing import ManualClock, MemoryQueue
from trace_servers.worker import Worker

TASK = "6b0c6a2e-7f1e-4e55-9e8f-1a2b3c4d5e6f"


class DownDispatcher:
    async def claim_many(self, task_ids: list[str], worker_id: str) -> Any:
        raise errors.Unavailable("dispatcher down")


class RefusingDispatcher:
    def __init__(self, code: str) -> None:
        self.code = code

    async def claim_many(self, task_ids: list[str], worker_id: str) -> wire.ClaimBatchResponse:
        return wire.ClaimBatchResponse(
            claims=[], refused=[wire.ClaimRefusal(t, self.code, "no") for t in task_ids]
        )


async def _received(queue: MemoryQueue) -> list[Any]:
    await queue.send([f'{{"task_id": "{TASK}"}}'.encode()])
    return await queue.receive(max_messages=10, visibility_timeout=30)


async def test_transient_claim_failure_makes_the_wakeup_reappear_soon() -> None:
    clock = ManualClock()
    queue = MemoryQueue("tasks", clock=clock)
    worker = Worker(client=DownDispatcher(), queue=queue, operators={})  # type: ignore[arg-type]
    await worker._claim_and_start(await _received(queue))
    clock.advance(1.6)  # retry_after_s=1.0 with jitter in [0.5, 1.5): visible again
    again = await queue.receive(max_messages=10)
    assert len(again) == 1 and again[0].receive_count == 2


async def test_locked_row_refusal_retries_soon_but_final_refusals_ack() -> None:
    clock = ManualClock()
    queue = MemoryQueue("tasks", clock=clock)
    worker = Worker(
        client=RefusingDispatcher("unavailable"),
        queue=queue,  # type: ignore[arg-type]
        operators={},
    )
    await worker._claim_and_start(await _received(queue))
    clock.advance(1.6)
    assert len(await queue.receive(max_messages=10)) == 1

    queue2 = MemoryQueue("tasks", clock=ManualClock())
    worker2 = Worker(
        client=RefusingDispatcher("task_not_claimable"),  # type: ignore[arg-type]
        queue=queue2,
        operators={},
    )
    await worker2._claim_and_start(await _received(queue2))
    await worker2._acks.close()
    assert await queue2.depth() == 0  # acknowledged: a duplicate wake-up is dropped
