"""Wake-ups from Postgres: ``LISTEN <channel>`` on a dedicated connection.

A trigger or statement sends ``NOTIFY <channel>`` at the commit of what made work due (the
Delivery Service's deliveries, migration 0029; the DAG fan-out's announcements, migration
0032). A loop ``clear()``s before a pass and, after a pass that found nothing, ``wait``s for
the next notification or its poll interval, whichever comes first: work made due while the
pass ran is not missed (the notification set the flag the wait looks at), and an idle loop
sees new work within a round trip instead of up to a whole poll interval later.

Notifications are hints: the poll stays the fallback (later ``available_at``, a listener
down). The listener reconnects after a failure, backing off, and then wakes its waiter, since
notifications may have been lost while it was away; a quiet connection is probed every
``probe_s`` seconds so a dead one is noticed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Self

import psycopg
from psycopg import sql

from trace_sdk.aio import run_every

log = logging.getLogger("trace.wakeups")

_RECONNECT_MIN_S = 0.1
_RECONNECT_MAX_S = 5.0


class PgWakeups:
    """A ``LISTEN <channel>`` connection whose notifications set one flag."""

    def __init__(self, conninfo: str, channel: str, *, probe_s: float = 30.0) -> None:
        self._conninfo = conninfo
        self.channel = channel
        self._probe_s = probe_s
        self._woken = asyncio.Event()
        #: set while the connection listens (tests wait for it before notifying)
        self.listening = asyncio.Event()
        #: notifications received so far
        self.notifications = 0
        self._task: asyncio.Task[None] | None = None
        self._conn: psycopg.AsyncConnection[Any] | None = None

    async def start(self, ready_timeout_s: float = 5.0) -> Self:
        """Start listening; wait up to ``ready_timeout_s`` until the connection listens (if it
        cannot, the loop still runs on its poll and the listener keeps trying)."""
        if self._task is None:
            self._task = asyncio.create_task(self._listen(), name=f"wakeups-{self.channel}")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.listening.wait(), ready_timeout_s)
        return self

    def clear(self) -> None:
        """Forget the notifications received so far (call before looking for due work)."""
        self._woken.clear()

    async def wait(self, timeout_s: float) -> bool:
        """Until a notification arrives (or arrived since ``clear``) or ``timeout_s`` passes;
        True when woken."""
        try:
            await asyncio.wait_for(self._woken.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def wait_or_stop(self, stop: asyncio.Event, timeout_s: float) -> None:
        """``wait``, ending early too when ``stop`` is set."""
        waits = [asyncio.ensure_future(self.wait(timeout_s)), asyncio.ensure_future(stop.wait())]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._close_conn()

    async def _listen(self) -> None:
        delay = _RECONNECT_MIN_S
        while True:
            try:
                self._conn = await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True)
                await self._conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
                self.listening.set()
                delay = _RECONNECT_MIN_S
                self._woken.set()  # notifications may have been lost while not listening
                while True:
                    async for _ in self._conn.notifies(timeout=self._probe_s):
                        self.notifications += 1
                        self._woken.set()
                    await self._conn.execute("SELECT 1")  # a quiet connection may be dead
            except psycopg.Error as exc:
                self.listening.clear()
                log.info(
                    "wake-ups: listener lost; reconnecting",
                    extra={"channel": self.channel, "error": str(exc)},
                )
            finally:
                await self._close_conn()
            await asyncio.sleep(delay)
            delay = min(delay * 2, _RECONNECT_MAX_S)

    async def _close_conn(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                await conn.close()


async def run_woken(
    stop: asyncio.Event,
    conninfo: object,
    channel: str,
    every_s: float,
    drain: Callable[[], Awaitable[object]],
    *,
    name: str,
    logger: logging.Logger,
) -> None:
    """Run ``drain`` (a pass over everything due) until ``stop`` is set: after each pass, wait
    for ``NOTIFY <channel>``, ``every_s`` or the stop, whichever comes first (``run_every``:
    failures are logged and retried with backoff). Without a connection string to listen on
    (``conninfo`` not a ``str``), a plain poll every ``every_s``."""
    if not isinstance(conninfo, str):
        await run_every(stop, every_s, drain, name=name, logger=logger)
        return
    wakeups = await PgWakeups(conninfo, channel).start()

    async def drain_then_wait() -> None:
        wakeups.clear()  # before the pass: what is announced during it wakes the wait
        await drain()
        await wakeups.wait_or_stop(stop, every_s)

    try:
        await run_every(stop, 0.0, drain_then_wait, name=name, logger=logger)
    finally:
        await wakeups.close()


__all__ = ["PgWakeups", "run_woken"]
