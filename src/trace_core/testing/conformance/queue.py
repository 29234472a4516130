"""The Queue port conformance suite: every Queue adapter runs these tests.

Use it by subclassing ``QueueConformance`` in a test module that provides two fixtures:

* ``queue`` -- a fresh, empty queue whose ``max_receives`` is 3;
* ``advance`` -- an async callable ``advance(seconds)`` that makes ``seconds`` pass for the
  adapter's visibility timeouts and delays (a ``ManualClock.advance`` for the memory queue; the
  Postgres queue shifts its rows' timestamps back, which is the same as time passing).

Example::

    class TestMemoryQueue(QueueConformance):
        @pytest.fixture
        def queue(self, clock): return MemoryQueue("q", max_receives=3, clock=clock)

        @pytest.fixture
        def advance(self, clock): ...

The suite checks behaviour, not speed: nothing in it asserts elapsed time. That a long poll is
woken by a send rather than by its own re-poll is each adapter's mechanism and is tested with
the adapter (the Postgres queue counts the notifications its listener receives).

What it pins down, beyond ``trace_core.ports``:

* message ids are strings; a redriven message starts again at ``receive_count`` 1 (its id may
  change, as with SQS);
* argument limits are SQS's: ``max_messages`` 1..10, ``visibility_timeout`` 0..43200 s,
  ``wait_seconds`` 0..20 s, ``delay_seconds`` 0..900 s -- outside them, ``ValidationFailed``;
* delivery order is not specified; no message is lost or delivered twice within its
  visibility timeout, even to concurrent receivers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from trace_core.errors import NotFound, PayloadTooLarge, ValidationFailed
from trace_core.ports import MAX_DEAD_LETTER_REASON, MAX_MESSAGE_BYTES, Queue, ReceivedMessage

#: The ``advance`` fixture's type.
Advance = Callable[[float], Awaitable[None]]

#: ``max_receives`` of the ``queue`` fixture.
MAX_RECEIVES = 3


async def _drain(queue: Any, *, visibility_timeout: float = 60.0) -> list[ReceivedMessage]:
    """Receive until a receive comes back empty."""
    out: list[ReceivedMessage] = []
    while batch := await queue.receive(max_messages=10, visibility_timeout=visibility_timeout):
        out.extend(batch)
    return out


class QueueConformance:
    """Tests every ``Queue`` adapter must pass; see the module docstring for the fixtures."""

    async def test_implements_the_port(self, queue: Any) -> None:
        assert isinstance(queue, Queue)
        assert isinstance(queue.name, str) and queue.name

    async def test_send_receive_delete(self, queue: Any, advance: Advance) -> None:
        ids = await queue.send([b"a", b"b", b"c"])
        assert len(ids) == 3 and len(set(ids)) == 3
        assert all(isinstance(i, str) for i in ids)
        got = await _drain(queue, visibility_timeout=30)
        assert sorted(m.body for m in got) == [b"a", b"b", b"c"]
        assert {m.message_id for m in got} == set(ids)
        assert all(m.receive_count == 1 for m in got)
        assert len({m.receipt for m in got}) == 3
        await queue.delete([m.receipt for m in got])
        await advance(31)
        assert await queue.receive(max_messages=10) == []

    async def test_receive_on_an_empty_queue_returns_nothing(self, queue: Any) -> None:
        assert await queue.receive() == []

    async def test_send_of_nothing_sends_nothing(self, queue: Any) -> None:
        assert await queue.send([]) == []
        assert await queue.receive() == []

    async def test_no_message_is_lost(self, queue: Any) -> None:
        bodies = [f"task-{i}".encode() for i in range(25)]
        sent = [*await queue.send(bodies[:10]), *await queue.send(bodies[10:20])]
        sent += await queue.send(bodies[20:])
        got = await _drain(queue)
        assert sorted(m.message_id for m in got) == sorted(sent)
        assert sorted(m.body for m in got) == sorted(bodies)

    async def test_batch_send_returns_ids_in_order(self, queue: Any) -> None:
        bodies = [f"{i}".encode() for i in range(10)]
        ids = await queue.send(bodies)
        by_id = {m.message_id: m.body for m in await _drain(queue)}
        assert [by_id[i] for i in ids] == bodies

    async def test_max_messages_caps_a_receive(self, queue: Any) -> None:
        await queue.send([b"1", b"2", b"3", b"4"])
        first = await queue.receive(max_messages=3)
        assert 1 <= len(first) <= 3
        rest = await _drain(queue)
        assert len(first) + len(rest) == 4

    async def test_visibility_timeout_hides_then_re_exposes(
        self, queue: Any, advance: Advance
    ) -> None:
        [sent] = await queue.send([b"x"])
        [first] = await queue.receive(visibility_timeout=30)
        assert await queue.receive() == []
        await advance(20)
        assert await queue.receive() == []
        await advance(11)
        [second] = await queue.receive(visibility_timeout=30)
        assert first.message_id == second.message_id == sent
        assert second.body == b"x"
        assert (first.receive_count, second.receive_count) == (1, 2)
        assert first.receipt != second.receipt

    async def test_zero_visibility_timeout_re_exposes_at_once(self, queue: Any) -> None:
        await queue.send([b"x"])
        [first] = await queue.receive(visibility_timeout=0)
        [second] = await queue.receive(visibility_timeout=30)
        assert first.message_id == second.message_id
        assert second.receive_count == 2

    async def test_stale_receipt_cannot_extend_or_delete(
        self, queue: Any, advance: Advance
    ) -> None:
        await queue.send([b"x"])
        [first] = await queue.receive(visibility_timeout=10)
        await advance(11)
        [second] = await queue.receive(visibility_timeout=10)
        with pytest.raises(NotFound):
            await queue.extend_visibility(first.receipt, 60)
        await queue.delete([first.receipt])  # a no-op: the message survives
        await advance(11)
        [third] = await queue.receive(visibility_timeout=10)
        assert third.message_id == first.message_id
        assert third.receive_count == 3
        with pytest.raises(NotFound):
            await queue.extend_visibility(second.receipt, 60)
        await queue.delete([third.receipt])
        await advance(11)
        assert await queue.receive() == []
        assert await queue.dead_letters() == []

    async def test_extend_keeps_the_message_hidden(self, queue: Any, advance: Advance) -> None:
        await queue.send([b"x"])
        [msg] = await queue.receive(visibility_timeout=10)
        await advance(5)
        await queue.extend_visibility(msg.receipt, 30)
        await advance(10)
        assert await queue.receive() == []
        await advance(21)
        [again] = await queue.receive()
        assert again.message_id == msg.message_id
        assert again.receive_count == 2

    async def test_extend_after_delete_is_not_found(self, queue: Any) -> None:
        await queue.send([b"x"])
        [msg] = await queue.receive()
        await queue.delete([msg.receipt])
        await queue.delete([msg.receipt])  # deleting twice is harmless
        with pytest.raises(NotFound):
            await queue.extend_visibility(msg.receipt, 30)

    async def test_unknown_receipts(self, queue: Any) -> None:
        with pytest.raises(NotFound):
            await queue.extend_visibility("no-such-receipt", 30)
        with pytest.raises(NotFound):
            await queue.extend_visibility("00000000-0000-4000-8000-000000000000", 30)
        await queue.delete(["no-such-receipt", "00000000-0000-4000-8000-000000000000"])
        await queue.delete([])

    async def test_dead_letter_after_max_receives(self, queue: Any, advance: Advance) -> None:
        [poison] = await queue.send([b"poison"])
        for count in range(1, MAX_RECEIVES + 1):
            [msg] = await queue.receive(visibility_timeout=10)
            assert (msg.message_id, msg.receive_count) == (poison, count)
            await advance(11)
        [healthy] = await queue.send([b"healthy"])
        got = await queue.receive(max_messages=10)
        assert [m.message_id for m in got] == [healthy]
        with pytest.raises(NotFound):
            await queue.extend_visibility(msg.receipt, 30)
        await advance(31)
        assert [m.message_id for m in await queue.receive()] == [healthy]
        [dead] = await queue.dead_letters()
        assert dead.message_id == poison
        assert dead.body == b"poison"
        assert dead.receive_count >= MAX_RECEIVES

    async def test_dead_letter_moves_a_received_message_at_once_with_its_reason(
        self, queue: Any, advance: Advance
    ) -> None:
        await queue.send([b"junk", b"fine", b"also junk"])
        got = {m.body: m for m in await _drain(queue, visibility_timeout=10)}
        await queue.dead_letter(
            [(got[b"junk"], "body is not JSON"), (got[b"also junk"], "task_id is not a UUID")]
        )
        await queue.dead_letter([])  # nothing to move is fine
        with pytest.raises(NotFound):
            await queue.extend_visibility(got[b"junk"].receipt, 30)
        dead = await queue.dead_letters()
        assert sorted((m.body, m.dead_letter_reason) for m in dead) == [
            (b"also junk", "task_id is not a UUID"),
            (b"junk", "body is not JSON"),
        ]
        await advance(11)
        [again] = await queue.receive()  # the rest of the receive is untouched
        assert (again.body, again.receive_count) == (b"fine", 2)
        assert again.dead_letter_reason is None

    async def test_dead_letter_ignores_a_stale_receipt(self, queue: Any, advance: Advance) -> None:
        await queue.send([b"x"])
        [first] = await queue.receive(visibility_timeout=10)
        await advance(11)
        [second] = await queue.receive(visibility_timeout=10)
        await queue.dead_letter([(first, "stale")])
        assert await queue.dead_letters() == []
        await queue.dead_letter([(second, "bad\nreason " + "x" * 5000)])
        [dead] = await queue.dead_letters()
        assert dead.body == b"x"
        reason = dead.dead_letter_reason
        assert reason is not None and reason.startswith("bad?reason x")
        assert len(reason) <= MAX_DEAD_LETTER_REASON

    async def test_redrive_moves_dead_letters_back(self, queue: Any, advance: Advance) -> None:
        await queue.send([b"p1", b"p2"])
        for _ in range(MAX_RECEIVES):
            assert len(await _drain(queue, visibility_timeout=10)) == 2
            await advance(11)
        assert await queue.receive() == []  # both move to the dead-letter queue here
        assert await queue.redrive(max_messages=1) == 1
        assert await queue.redrive() == 1
        assert await queue.redrive() == 0
        got = await _drain(queue)
        assert sorted(m.body for m in got) == [b"p1", b"p2"]
        assert all(m.receive_count == 1 for m in got)
        assert all(m.dead_letter_reason is None for m in got)
        assert await queue.dead_letters() == []

    async def test_oversized_body_sends_nothing(self, queue: Any) -> None:
        with pytest.raises(PayloadTooLarge):
            await queue.send([b"small", b"x" * (MAX_MESSAGE_BYTES + 1)])
        assert await queue.receive() == []
        [sent] = await queue.send([b"y" * MAX_MESSAGE_BYTES])
        [msg] = await queue.receive()
        assert msg.message_id == sent
        assert msg.body == b"y" * MAX_MESSAGE_BYTES

    async def test_binary_bodies_round_trip(self, queue: Any) -> None:
        body = bytes(range(256)) * 4
        await queue.send([body, b""])
        assert sorted(m.body for m in await _drain(queue)) == [b"", body]

    async def test_bad_arguments_are_validation_errors(self, queue: Any) -> None:
        with pytest.raises(ValidationFailed):
            await queue.send(b"not-a-list")
        with pytest.raises(ValidationFailed):
            await queue.send([b"x"], delay_seconds=901)
        with pytest.raises(ValidationFailed):
            await queue.send([b"x"], delay_seconds=-1)
        for kwargs in (
            {"max_messages": 0},
            {"max_messages": 11},
            {"visibility_timeout": -1},
            {"visibility_timeout": 43_201},
            {"wait_seconds": -1},
            {"wait_seconds": 21},
        ):
            with pytest.raises(ValidationFailed):
                await queue.receive(**kwargs)
        assert await queue.receive() == []  # nothing was sent by the bad calls

    async def test_concurrent_receivers_never_share_a_message(self, queue: Any) -> None:
        bodies = [f"task-{i}".encode() for i in range(200)]
        sent: list[str] = []
        for start in range(0, len(bodies), 10):
            sent += await queue.send(bodies[start : start + 10])

        async def receiver() -> list[ReceivedMessage]:
            mine: list[ReceivedMessage] = []
            while batch := await queue.receive(max_messages=10, visibility_timeout=120):
                mine.extend(batch)
                await asyncio.sleep(0)
            return mine

        per_receiver = await asyncio.gather(*(receiver() for _ in range(8)))
        ids = [m.message_id for mine in per_receiver for m in mine]
        assert len(ids) == len(set(ids)), "a message was delivered twice within its visibility"
        assert sorted(ids) == sorted(sent)

    async def test_long_poll_returns_a_message_sent_while_it_waits(self, queue: Any) -> None:
        receiving = asyncio.ensure_future(queue.receive(wait_seconds=5))
        await asyncio.sleep(0.2)
        assert not receiving.done()  # it waits for a message instead of returning empty
        [sent] = await queue.send([b"late"])
        got = await receiving
        assert [(m.message_id, m.body) for m in got] == [(sent, b"late")]

    async def test_long_poll_times_out_empty(self, queue: Any) -> None:
        assert await queue.receive(wait_seconds=0.3) == []

    async def test_delay_seconds_hides_a_new_message(self, queue: Any, advance: Advance) -> None:
        [late] = await queue.send([b"late"], delay_seconds=10)
        [now] = await queue.send([b"now"])
        assert [m.message_id for m in await queue.receive()] == [now]
        await advance(5)
        assert await queue.receive() == []
        await advance(6)
        [msg] = await queue.receive()
        assert (msg.message_id, msg.receive_count) == (late, 1)


__all__ = ["MAX_RECEIVES", "Advance", "QueueConformance"]
