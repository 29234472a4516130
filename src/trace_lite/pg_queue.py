"""The Lite Queue adapter: a work queue in one Postgres table (``queue_messages``).

Theory of operation. A message is a row. ``receive`` is one statement that, under
``FOR UPDATE SKIP LOCKED``, picks visible rows (``NOT dead AND visible_at <= now()``), bumps
their ``receive_count``, gives each a fresh ``receipt`` and pushes ``visible_at`` out by the
visibility timeout -- so two receivers, in one process or many, never hold the same message at
once. In the same statement, visible rows already received ``max_receives`` times are marked
dead instead (the dead-letter queue). ``extend_visibility`` and ``delete`` are compare-and-swaps
on the receipt, so a receiver whose visibility lapsed and whose message was received again can
neither extend (``NotFound``) nor delete (no-op) it. All times are the database's ``now()``.

Wake-ups. ``send`` and ``redrive`` call ``pg_notify('trace_queue', <queue name>)`` in the same
statement. A long poll (``receive(wait_seconds>0)``) waits for a notification on a dedicated
``LISTEN`` connection (one per ``PgQueue``, opened lazily, reconnected after a failure) and
re-polls every ``poll_interval`` seconds as a fallback, so a sleeping receiver wakes within
milliseconds of a send, and within ``poll_interval`` even if the listener is down.

Failures. psycopg errors become ``trace_core.errors.Unavailable`` at this boundary. When a
statement fails because its pooled connection was dead (e.g. Postgres restarted), the pool is
checked and the statement retried once on a fresh connection; like any at-least-once queue this
can, in the rare case where the server committed but the reply was lost, deliver a duplicate.

Use an autocommit pool (``kwargs={"autocommit": True}``) so each operation is one round trip;
a non-autocommit pool works too, with an extra ``COMMIT`` per operation.

Requires migrations ``0002_queue.sql`` and ``0007_queue_dead_reason.sql``.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import uuid
from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool

from trace_core.errors import NotFound, Unavailable, ValidationFailed
from trace_core.ports import ReceivedMessage
from trace_core.queue_args import check_bodies, check_range, dead_letter_reason
from trace_lite import sqlfile

log = logging.getLogger(__name__)

#: The NOTIFY channel; the payload is the queue name.
CHANNEL = "trace_queue"

#: Argument limits, the same in every adapter (SQS's limits).
MAX_BATCH_RECEIVE = 10
MAX_VISIBILITY_SECONDS = 43_200
MAX_WAIT_SECONDS = 20
MAX_DELAY_SECONDS = 900

_RECONNECT_MIN = 0.05
_RECONNECT_MAX = 2.0
#: How long a listener waits for a notification before probing its connection.
_LISTEN_PROBE_SECONDS = 30.0


class PgQueue:
    """A ``Queue`` over Postgres; see the module docstring.

    ``pool_or_conninfo`` is a ``psycopg_pool.AsyncConnectionPool`` (not closed by ``close``) or
    a libpq connection string (the queue then owns a small autocommit pool, opened lazily).
    ``poll_interval`` is the long poll's fallback re-poll period in seconds.
    """

    def __init__(
        self,
        pool_or_conninfo: AsyncConnectionPool[Any] | str,
        name: str,
        *,
        max_receives: int = 5,
        poll_interval: float = 1.0,
    ) -> None:
        if not name:
            raise ValueError("a queue needs a name")
        if max_receives < 1:
            raise ValueError("max_receives must be at least 1")
        self._name = name
        self._max_receives = max_receives
        self._poll_interval = poll_interval
        self._sql = sqlfile.load("queue.sql")
        self._pool: AsyncConnectionPool[Any]
        if isinstance(pool_or_conninfo, str):
            self._pool = AsyncConnectionPool(
                pool_or_conninfo,
                min_size=1,
                max_size=4,
                kwargs={"autocommit": True},
                open=False,
                timeout=5.0,
                name=f"trace-queue-{name}",
            )
            self._owns_pool = True
        else:
            self._pool = pool_or_conninfo
            self._owns_pool = False
        self._pool_opened = not self._owns_pool
        self._open_lock = asyncio.Lock()
        self._closed = False
        self._wakeup = asyncio.Event()
        self._listening = asyncio.Event()
        self._listener: asyncio.Task[None] | None = None
        self._listener_conn: psycopg.AsyncConnection[Any] | None = None
        #: Notifications for this queue the listener has received (for tests and metrics).
        self.notifications = 0

    @property
    def name(self) -> str:
        """The queue's name."""
        return self._name

    @property
    def max_receives(self) -> int:
        """How many receives a message gets before it moves to the dead-letter queue."""
        return self._max_receives

    # -- the Queue port ------------------------------------------------------------------------

    async def send(self, bodies: Sequence[bytes], *, delay_seconds: int = 0) -> list[str]:
        """Send messages in one statement; returns their ids in order.

        Raises ``PayloadTooLarge`` if any body exceeds ``MAX_MESSAGE_BYTES`` (nothing is sent),
        ``ValidationFailed`` for a bad argument, ``Unavailable``.
        """
        checked = check_bodies(bodies)
        check_range("delay_seconds", delay_seconds, 0, MAX_DELAY_SECONDS)
        if not checked:
            return []
        rows = await self._fetch(
            "send", {"queue": self._name, "bodies": checked, "delay": delay_seconds}
        )
        return [str(message_id) for (message_id,) in rows]

    async def receive(
        self,
        *,
        max_messages: int = 10,
        visibility_timeout: float = 30.0,
        wait_seconds: float = 0.0,
    ) -> list[ReceivedMessage]:
        """Receive up to ``max_messages`` visible messages, hiding them for ``visibility_timeout``.

        Waits up to ``wait_seconds`` for at least one message, woken by ``NOTIFY``.
        Raises ``ValidationFailed`` for a bad argument, ``Unavailable``.
        """
        check_range("max_messages", max_messages, 1, MAX_BATCH_RECEIVE)
        check_range("visibility_timeout", visibility_timeout, 0, MAX_VISIBILITY_SECONDS)
        check_range("wait_seconds", wait_seconds, 0, MAX_WAIT_SECONDS)
        params = {
            "queue": self._name,
            "limit": max_messages,
            "visibility": float(visibility_timeout),
            "max_receives": self._max_receives,
        }
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_seconds
        if wait_seconds > 0:
            await self._ensure_listener(min(wait_seconds, 1.0))
        while True:
            wakeup = self._wakeup  # taken before the query, so a NOTIFY during it is not lost
            rows = await self._fetch("receive", params)
            remaining = deadline - loop.time()
            if rows or remaining <= 0:
                return [_message(row) for row in rows]
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wakeup.wait(), min(self._poll_interval, remaining))

    async def extend_visibility(self, receipt: str, visibility_timeout: float) -> None:
        """Hide the message for ``visibility_timeout`` more seconds from now.

        Raises ``NotFound`` if the receipt is stale (message deleted, received again or dead),
        ``ValidationFailed`` for a bad timeout, ``Unavailable``.
        """
        check_range("visibility_timeout", visibility_timeout, 0, MAX_VISIBILITY_SECONDS)
        parsed = _parse_receipt(receipt)
        if parsed is None:
            raise NotFound("the receipt is stale: the message was deleted or received again")
        rows = await self._fetch(
            "extend",
            {"queue": self._name, "receipt": parsed, "visibility": float(visibility_timeout)},
        )
        if not rows:
            raise NotFound("the receipt is stale: the message was deleted or received again")

    async def delete(self, receipts: Sequence[str]) -> None:
        """Delete received messages (or dead letters) in one statement; stale receipts are
        ignored. Raises ``Unavailable``."""
        if isinstance(receipts, str):
            raise ValidationFailed("receipts must be a sequence of receipts", field="receipts")
        parsed = [p for r in receipts if (p := _parse_receipt(r)) is not None]
        if parsed:
            await self._execute("delete", {"queue": self._name, "receipts": parsed})

    async def dead_letter(self, letters: Sequence[tuple[ReceivedMessage, str]]) -> None:
        """Move received messages to the dead-letter queue now, each with its reason, in one
        statement; stale receipts are ignored. Raises ``Unavailable``."""
        parsed = [
            (p, dead_letter_reason(reason))
            for message, reason in letters
            if (p := _parse_receipt(message.receipt)) is not None
        ]
        if parsed:
            await self._execute(
                "dead_letter",
                {
                    "queue": self._name,
                    "receipts": [r for r, _ in parsed],
                    "reasons": [why for _, why in parsed],
                },
            )

    async def dead_letters(self, *, max_messages: int = 10) -> list[ReceivedMessage]:
        """Return up to ``max_messages`` dead letters, oldest first, each with a fresh receipt.

        Dead letters stay in the dead-letter queue (they are not hidden); ``delete`` with the
        returned receipt discards one. Raises ``ValidationFailed``, ``Unavailable``.
        """
        check_range("max_messages", max_messages, 1, MAX_BATCH_RECEIVE)
        rows = await self._fetch("dead_letters", {"queue": self._name, "limit": max_messages})
        return [_message(row) for row in rows]

    async def redrive(self, *, max_messages: int = 100) -> int:
        """Move up to ``max_messages`` dead letters back to the queue; returns how many moved.

        A redriven message keeps its id and starts again with ``receive_count`` 0.
        Raises ``ValidationFailed``, ``Unavailable``.
        """
        if isinstance(max_messages, bool) or max_messages < 1:
            raise ValidationFailed("max_messages must be at least 1", field="max_messages")
        ((moved, _woken),) = await self._fetch(
            "redrive", {"queue": self._name, "limit": max_messages}
        )
        return int(moved)

    async def depth(self) -> int:
        """How many messages are neither deleted nor dead (visible, in flight or delayed).

        Raises ``Unavailable``.
        """
        ((depth,),) = await self._fetch("depth", {"queue": self._name})
        return int(depth)

    async def close(self) -> None:
        """Stop the listener and close the owned pool (a caller's pool is left open)."""
        if self._closed:
            return
        self._closed = True
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
            self._listener = None
        await self._close_listener_conn()
        if self._owns_pool and self._pool_opened:
            await self._pool.close()

    async def __aenter__(self) -> PgQueue:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- statements ----------------------------------------------------------------------------

    async def _fetch(self, query: str, params: dict[str, Any]) -> list[TupleRow]:
        result = await self._run(query, params, fetch=True)
        assert isinstance(result, list)
        return result

    async def _execute(self, query: str, params: dict[str, Any]) -> None:
        await self._run(query, params, fetch=False)

    async def _run(
        self, query: str, params: dict[str, Any], *, fetch: bool
    ) -> list[TupleRow] | None:
        if self._closed:
            raise Unavailable(f"queue {self._name!r} is closed")
        pool = await self._open_pool()
        statement = self._sql[query]
        for attempt in (1, 2):
            conn: psycopg.AsyncConnection[Any] | None = None
            try:
                async with pool.connection() as conn:
                    cur = await conn.execute(statement, params)
                    return await cur.fetchall() if fetch else None
            except psycopg.OperationalError as exc:
                if attempt == 1 and conn is not None and conn.broken:
                    # the pooled connection was dead (restart, terminated backend): drop the
                    # other dead ones and try once more on a fresh connection
                    log.info("queue %s: connection lost (%s); retrying once", self._name, exc)
                    with contextlib.suppress(Exception):
                        await pool.check()
                    continue
                raise Unavailable(
                    f"queue {self._name!r}: database unavailable during {query}"
                ) from exc
            except psycopg.Error as exc:
                raise Unavailable(f"queue {self._name!r}: database error during {query}") from exc
        raise AssertionError("unreachable")  # pragma: no cover

    async def _open_pool(self) -> AsyncConnectionPool[Any]:
        if not self._pool_opened:
            async with self._open_lock:
                if not self._pool_opened:
                    # wait=False: a database that is down now is reported per call, not here
                    await self._pool.open(wait=False)
                    self._pool_opened = True
        return self._pool

    # -- the listener --------------------------------------------------------------------------

    async def _ensure_listener(self, ready_timeout: float) -> None:
        """Start the LISTEN task if it is not running; wait briefly until it listens."""
        if self._closed:
            return
        if self._listener is None or self._listener.done():
            self._listener = asyncio.create_task(
                self._listen_forever(), name=f"trace-queue-listener-{self._name}"
            )
        if not self._listening.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._listening.wait(), ready_timeout)

    def _wake(self) -> None:
        self._wakeup.set()
        self._wakeup = asyncio.Event()

    async def _listen_forever(self) -> None:
        delay = _RECONNECT_MIN
        while not self._closed:
            try:
                conninfo, kwargs = await self._listener_params()
                conn = await psycopg.AsyncConnection.connect(
                    conninfo, **{**kwargs, "autocommit": True}
                )
                self._listener_conn = conn
                await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(CHANNEL)))
                self._listening.set()
                delay = _RECONNECT_MIN
                self._wake()  # notifications may have been missed while disconnected
                while True:
                    async for note in conn.notifies(timeout=_LISTEN_PROBE_SECONDS):
                        if note.payload == self._name:
                            self.notifications += 1
                            self._wake()
                    await conn.execute("SELECT 1")  # a quiet connection may be a dead one
            except psycopg.Error as exc:
                self._listening.clear()
                log.info("queue %s: listener lost (%s); reconnecting", self._name, exc)
            finally:
                await self._close_listener_conn()
            await asyncio.sleep(delay)
            delay = min(delay * 2, _RECONNECT_MAX)

    async def _listener_params(self) -> tuple[str, dict[str, Any]]:
        """The pool's connection parameters (psycopg_pool accepts callables for both)."""
        conninfo: Any = self._pool.conninfo
        kwargs: Any = self._pool.kwargs
        if callable(conninfo):
            conninfo = conninfo()
            if inspect.isawaitable(conninfo):
                conninfo = await conninfo
        if callable(kwargs):
            kwargs = kwargs()
            if inspect.isawaitable(kwargs):
                kwargs = await kwargs
        return str(conninfo), dict(kwargs or {})

    async def _close_listener_conn(self) -> None:
        conn, self._listener_conn = self._listener_conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()


def _message(row: TupleRow) -> ReceivedMessage:
    message_id, body, receipt, receive_count, *dead = row  # dead_letters adds dead_reason
    return ReceivedMessage(
        message_id=str(message_id),
        body=bytes(body),
        receipt=str(receipt),
        receive_count=int(receive_count),
        dead_letter_reason=dead[0] if dead else None,
    )


def _parse_receipt(receipt: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(receipt)
    except (ValueError, TypeError, AttributeError):
        return None


__all__ = ["CHANNEL", "PgQueue"]
