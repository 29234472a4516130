"""The Queue conformance suite on the in-memory queue, plus its fault hooks."""

from __future__ import annotations

import pytest

from trace_core.errors import Unavailable
from trace_core.testing.clock import ManualClock
from trace_core.testing.conformance.queue import MAX_RECEIVES, Advance, QueueConformance
from trace_core.testing.memory_queue import MemoryQueue


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def queue(clock: ManualClock) -> MemoryQueue:
    return MemoryQueue("tasks", max_receives=MAX_RECEIVES, clock=clock)


@pytest.fixture
def advance(clock: ManualClock) -> Advance:
    async def advance(seconds: float) -> None:
        clock.advance(seconds)

    return advance


class TestMemoryQueue(QueueConformance):
    pass


async def test_duplicate_next_send_delivers_two_messages(queue: MemoryQueue) -> None:
    queue.duplicate_next_send()
    ids = await queue.send([b"a", b"b"])
    got = await queue.receive()
    assert sorted(m.body for m in got) == [b"a", b"a", b"b"]
    assert len({m.message_id for m in got}) == 3
    assert set(ids) < {m.message_id for m in got}
    await queue.send([b"c"])  # only once
    assert [m.body for m in await queue.receive()] == [b"c"]


async def test_reorder_is_deterministic_per_seed() -> None:
    orders = []
    for _ in range(2):
        q = MemoryQueue("q", clock=ManualClock())
        await q.send([str(i).encode() for i in range(10)])
        q.reorder(seed=7)
        orders.append([m.body for m in await q.receive()])
    assert orders[0] == orders[1]
    assert orders[0] != [str(i).encode() for i in range(10)]
    assert sorted(orders[0]) == sorted(str(i).encode() for i in range(10))


async def test_fail_next_raises_once_without_effect(queue: MemoryQueue) -> None:
    queue.fail_next("send", Unavailable())
    with pytest.raises(Unavailable):
        await queue.send([b"x"])
    assert await queue.receive() == []
    await queue.send([b"x"])
    queue.fail_next("receive", Unavailable())
    with pytest.raises(Unavailable):
        await queue.receive()
    [msg] = await queue.receive()
    assert msg.receive_count == 1
    with pytest.raises(ValueError):
        queue.fail_next("explode", Unavailable())


async def test_lost_delete_leaves_the_message(queue: MemoryQueue, advance: Advance) -> None:
    await queue.send([b"x"])
    [msg] = await queue.receive(visibility_timeout=10)
    queue.lose_next_delete()
    await queue.delete([msg.receipt])
    assert await queue.depth() == 1
    await advance(11)
    [again] = await queue.receive(visibility_timeout=10)
    assert again.message_id == msg.message_id
    await queue.delete([again.receipt])
    assert await queue.depth() == 0


async def test_dead_letter_receipt_discards_it(queue: MemoryQueue, advance: Advance) -> None:
    await queue.send([b"poison"])
    for _ in range(MAX_RECEIVES):
        await queue.receive(visibility_timeout=1)
        await advance(2)
    assert await queue.receive() == []
    [dead] = await queue.dead_letters()
    await queue.delete([dead.receipt])
    assert await queue.dead_letters() == []
    assert await queue.redrive() == 0
