"""An in-memory ``Queue`` with an injectable clock and fault hooks, for tests.

``MemoryQueue`` keeps the same invariants as the Lite and AWS queues (see ``trace_core.ports``)
and runs the same conformance suite (``trace_core.testing.conformance.queue``):

* a body is at most ``MAX_MESSAGE_BYTES``; a batch with one oversized body sends nothing;
* a received message is hidden until ``clock.monotonic()`` reaches its visibility deadline;
* every receive increments ``receive_count`` and issues a fresh receipt; only the latest
  receipt can extend (otherwise ``NotFound``) or delete (otherwise a no-op) the message;
* a message already received ``max_receives`` times moves to the dead-letter queue when it
  would next be delivered.

Time: visibility timeouts and delays are measured on ``clock`` (a ``ManualClock`` in tests,
``time.monotonic`` by default), so tests move time with ``ManualClock.advance``. The long poll
(``wait_seconds``) waits in real event-loop time and is woken at once by ``send``/``redrive``;
advancing a manual clock does not wake a waiting receiver.

Fault hooks (each applies to the next matching call only):

* ``duplicate_next_send()`` -- the next sent message is enqueued twice, as two messages with
  different ids (``send`` returns the first id), as an at-least-once backend may do;
* ``reorder(seed)`` -- shuffle the delivery order of the stored messages;
* ``fail_next(op, exc)`` -- the next call of method ``op`` raises ``exc`` before any effect;
* ``lose_next_delete()`` -- the next ``delete`` call does nothing, as if its ack was lost.

Extras beyond the port: ``depth()`` (messages not yet deleted and not dead) and
``dead_letters()`` receipts that ``delete`` accepts to discard a dead letter.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Sequence
from typing import Protocol

import attrs

from trace_core.errors import NotFound, ValidationFailed
from trace_core.ports import ReceivedMessage
from trace_core.queue_args import check_bodies, check_range, dead_letter_reason

#: Port methods ``fail_next`` can target.
OPERATIONS = frozenset(
    {"send", "receive", "extend_visibility", "delete", "dead_letter", "dead_letters", "redrive"}
)

#: Argument limits, the same in every adapter (SQS's limits).
MAX_BATCH_RECEIVE = 10
MAX_VISIBILITY_SECONDS = 43_200
MAX_WAIT_SECONDS = 20
MAX_DELAY_SECONDS = 900


class MonotonicClock(Protocol):
    """Anything with a ``monotonic()`` returning seconds, such as ``ManualClock``."""

    def monotonic(self) -> float: ...


class _SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()


@attrs.define
class _Message:
    message_id: str
    body: bytes
    visible_at: float
    receive_count: int = 0
    receipt: str | None = None
    dead: bool = False
    dead_reason: str | None = None


class MemoryQueue:
    """An in-memory Queue adapter for tests; see the module docstring."""

    def __init__(
        self,
        name: str,
        *,
        max_receives: int = 5,
        clock: MonotonicClock | None = None,
    ) -> None:
        if max_receives < 1:
            raise ValueError("max_receives must be at least 1")
        self._name = name
        self._max_receives = max_receives
        self._clock: MonotonicClock = clock if clock is not None else _SystemClock()
        #: Live and dead messages in delivery order.
        self._messages: list[_Message] = []
        self._by_receipt: dict[str, _Message] = {}
        self._next_id = 1
        self._arrived = asyncio.Event()
        self._duplicate_next = False
        self._lose_next_delete = False
        self._failures: dict[str, list[BaseException]] = {}

    @property
    def name(self) -> str:
        """The queue's name."""
        return self._name

    @property
    def max_receives(self) -> int:
        """How many receives a message gets before it moves to the dead-letter queue."""
        return self._max_receives

    # -- fault hooks ---------------------------------------------------------------------------

    def duplicate_next_send(self) -> None:
        """Deliver the next sent message twice, as two messages with different ids."""
        self._duplicate_next = True

    def reorder(self, seed: int = 0) -> None:
        """Shuffle the delivery order of the stored messages, deterministically for ``seed``."""
        random.Random(seed).shuffle(self._messages)

    def fail_next(self, op: str, exc: BaseException) -> None:
        """Make the next call of method ``op`` raise ``exc`` before it has any effect.

        Raises ``ValueError`` for an ``op`` not in ``OPERATIONS``.
        """
        if op not in OPERATIONS:
            raise ValueError(
                f"unknown queue operation {op!r}; expected one of {sorted(OPERATIONS)}"
            )
        self._failures.setdefault(op, []).append(exc)

    def lose_next_delete(self) -> None:
        """Make the next ``delete`` call silently do nothing, as if its ack was lost."""
        self._lose_next_delete = True

    # -- the Queue port ------------------------------------------------------------------------

    async def send(self, bodies: Sequence[bytes], *, delay_seconds: int = 0) -> list[str]:
        """Send messages; returns their ids in order.

        Raises ``PayloadTooLarge`` if any body exceeds ``MAX_MESSAGE_BYTES`` (nothing is sent),
        ``ValidationFailed`` for a bad argument.
        """
        self._maybe_fail("send")
        bodies = check_bodies(bodies)
        check_range("delay_seconds", delay_seconds, 0, MAX_DELAY_SECONDS)
        visible_at = self._clock.monotonic() + delay_seconds
        ids: list[str] = []
        for body in bodies:
            ids.append(self._enqueue(body, visible_at))
            if self._duplicate_next:
                self._duplicate_next = False
                self._enqueue(body, visible_at)
        if ids:
            self._wake()
        return ids

    async def receive(
        self,
        *,
        max_messages: int = 10,
        visibility_timeout: float = 30.0,
        wait_seconds: float = 0.0,
    ) -> list[ReceivedMessage]:
        """Receive up to ``max_messages`` visible messages, hiding them for ``visibility_timeout``.

        Waits up to ``wait_seconds`` of real time for at least one message.
        Raises ``ValidationFailed`` for a bad argument.
        """
        self._maybe_fail("receive")
        check_range("max_messages", max_messages, 1, MAX_BATCH_RECEIVE)
        check_range("visibility_timeout", visibility_timeout, 0, MAX_VISIBILITY_SECONDS)
        check_range("wait_seconds", wait_seconds, 0, MAX_WAIT_SECONDS)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_seconds
        while True:
            arrived = self._arrived
            received = self._receive_now(max_messages, visibility_timeout)
            remaining = deadline - loop.time()
            if received or remaining <= 0:
                return received
            try:
                await asyncio.wait_for(arrived.wait(), remaining)
            except TimeoutError:
                return self._receive_now(max_messages, visibility_timeout)

    async def extend_visibility(self, receipt: str, visibility_timeout: float) -> None:
        """Hide the message for ``visibility_timeout`` more seconds from now.

        Raises ``NotFound`` if the receipt is stale, ``ValidationFailed`` for a bad timeout.
        """
        self._maybe_fail("extend_visibility")
        check_range("visibility_timeout", visibility_timeout, 0, MAX_VISIBILITY_SECONDS)
        message = self._by_receipt.get(receipt)
        if message is None or message.dead:
            raise NotFound("the receipt is stale: the message was deleted or received again")
        message.visible_at = self._clock.monotonic() + visibility_timeout

    async def delete(self, receipts: Sequence[str]) -> None:
        """Delete received messages (or dead letters). Stale receipts are ignored."""
        self._maybe_fail("delete")
        if isinstance(receipts, str):
            raise ValidationFailed("receipts must be a sequence of receipts", field="receipts")
        if self._lose_next_delete:
            self._lose_next_delete = False
            return
        doomed = {id(m) for r in receipts if (m := self._by_receipt.pop(r, None)) is not None}
        if doomed:
            self._messages = [m for m in self._messages if id(m) not in doomed]

    async def dead_letter(self, letters: Sequence[tuple[ReceivedMessage, str]]) -> None:
        """Move received messages to the dead-letter queue now, each with its reason; stale
        receipts are ignored."""
        self._maybe_fail("dead_letter")
        for received, reason in letters:
            message = self._by_receipt.get(received.receipt)
            if message is None or message.dead:
                continue
            self._forget_receipt(message)
            message.dead = True
            message.dead_reason = dead_letter_reason(reason)

    async def dead_letters(self, *, max_messages: int = 10) -> list[ReceivedMessage]:
        """Return up to ``max_messages`` dead letters, oldest first, each with a fresh receipt.

        Dead letters stay in the dead-letter queue (they are not hidden); ``delete`` with the
        returned receipt discards one. Raises ``ValidationFailed`` for a bad argument.
        """
        self._maybe_fail("dead_letters")
        check_range("max_messages", max_messages, 1, MAX_BATCH_RECEIVE)
        out: list[ReceivedMessage] = []
        for message in self._messages:
            if len(out) == max_messages:
                break
            if message.dead:
                out.append(self._issue_receipt(message))
        return out

    async def redrive(self, *, max_messages: int = 100) -> int:
        """Move up to ``max_messages`` dead letters back to the queue; returns how many moved.

        A redriven message keeps its id and starts again with ``receive_count`` 0.
        """
        self._maybe_fail("redrive")
        if max_messages < 1:
            raise ValidationFailed("max_messages must be at least 1", field="max_messages")
        now = self._clock.monotonic()
        moved = 0
        for message in self._messages:
            if moved == max_messages:
                break
            if message.dead:
                self._forget_receipt(message)
                message.dead = False
                message.dead_reason = None
                message.receive_count = 0
                message.visible_at = now
                moved += 1
        if moved:
            self._wake()
        return moved

    async def depth(self) -> int:
        """How many messages are neither deleted nor dead (visible, in flight or delayed)."""
        return sum(1 for m in self._messages if not m.dead)

    # -- internals -----------------------------------------------------------------------------

    def _maybe_fail(self, op: str) -> None:
        pending = self._failures.get(op)
        if pending:
            raise pending.pop(0)

    def _enqueue(self, body: bytes, visible_at: float) -> str:
        message_id = f"{self._next_id:020d}"
        self._next_id += 1
        self._messages.append(_Message(message_id=message_id, body=body, visible_at=visible_at))
        return message_id

    def _wake(self) -> None:
        self._arrived.set()
        self._arrived = asyncio.Event()

    def _receive_now(self, max_messages: int, visibility_timeout: float) -> list[ReceivedMessage]:
        now = self._clock.monotonic()
        out: list[ReceivedMessage] = []
        for message in self._messages:
            if len(out) == max_messages:
                break
            if message.dead or message.visible_at > now:
                continue
            if message.receive_count >= self._max_receives:
                self._forget_receipt(message)
                message.dead = True
                continue
            message.receive_count += 1
            message.visible_at = now + visibility_timeout
            out.append(self._issue_receipt(message))
        return out

    def _issue_receipt(self, message: _Message) -> ReceivedMessage:
        self._forget_receipt(message)
        message.receipt = str(uuid.uuid4())
        self._by_receipt[message.receipt] = message
        return ReceivedMessage(
            message_id=message.message_id,
            body=message.body,
            receipt=message.receipt,
            receive_count=message.receive_count,
            dead_letter_reason=message.dead_reason if message.dead else None,
        )

    def _forget_receipt(self, message: _Message) -> None:
        if message.receipt is not None:
            self._by_receipt.pop(message.receipt, None)
            message.receipt = None


__all__ = ["MemoryQueue", "MonotonicClock"]
