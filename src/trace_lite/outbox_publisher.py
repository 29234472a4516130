"""The outbox publisher: hands due outbox rows to their consumers, at least once.

A row is claimed (``FOR UPDATE SKIP LOCKED``, so any number of publishers split the work) only
if its topic has a consumer in this process (``consumed_topics``): ``wake`` rows go to the task
queue (one message per task the row names: ``woken``), ``invoke`` rows to the Lambda launcher. Rows of other topics stay pending for their own
consumer (``buffer:<dataset>``: the buffer forwarder of ``trace sink``; ``dataset.invalidate``:
the DAG invalidation pass, ``trace_lite.dag_invalidations``), so nothing announced is marked published without having been taken. What happens to a claimed row is the kernel's decision
(``trace_core.outbox``): published once taken, backed off and finally dead after
``OutboxPolicy.max_tries`` failed sends.

``run`` is the publisher's loop: publish until nothing is due, then wait for ``NOTIFY
trace_outbox`` (sent at the commit of every transaction that writes a wake-up) or
``poll_s``, whichever comes first.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, Protocol

import psycopg
from psycopg_pool import AsyncConnectionPool

from trace_core import errors
from trace_core import outbox as outbox_sm
from trace_core.ports import Queue
from trace_lite.pg import transaction
from trace_lite.task_rows import INVOKE_TOPIC, WAKE_TOPIC, OutboxRow, Q, fetch
from trace_sdk.aio import run_every

log = logging.getLogger("trace.outbox")


class Launcher(Protocol):
    """Starts ``runtime: lambda`` tasks (``trace_aws.lambda_invoker.LambdaLauncher``)."""

    async def launch(self, task_id: str) -> object: ...


class SentRow(Protocol):
    """What recording a send needs of a claimed outbox row."""

    @property
    def id(self) -> int: ...
    @property
    def tries(self) -> int: ...
    @property
    def now(self) -> datetime: ...


async def record_sends(
    cur: psycopg.AsyncCursor[Any],
    sent: Sequence[SentRow],
    failed: Sequence[tuple[SentRow, str]],
    *,
    policy: outbox_sm.OutboxPolicy,
    rand: Callable[[], float],
    what: str,
    logger: logging.Logger = log,
) -> None:
    """Apply the outbox machine's decisions for one claimed batch: failed rows back off (or go
    dead after ``policy.max_tries``), sent rows are marked published. Every outbox consumer
    (this publisher, the sink's buffer forwarder) records its sends through here."""
    if failed:
        decisions = [
            outbox_sm.decide_send_failed(
                outbox_sm.OutboxState.PENDING, r.tries, now=r.now, policy=policy, rand=rand()
            )
            for r, _ in failed
        ]
        await cur.execute(
            Q["outbox_failed"],
            {
                "ids": [r.id for r, _ in failed],
                "states": [d.state.value for d in decisions],
                "tries": [d.tries for d in decisions],
                "available_ats": [d.available_at for d in decisions],
                "error": failed[0][1],
            },
        )
        logger.warning(what, extra={"error": failed[0][1], "rows": len(failed)})
    if sent:
        published = [outbox_sm.decide_sent(outbox_sm.OutboxState.PENDING, r.tries) for r in sent]
        await cur.execute(
            Q["outbox_published"],
            {
                "ids": [r.id for r in sent],
                "states": [d.state.value for d in published],
                "tries": [d.tries for d in published],
            },
        )


class OutboxPublisher:
    """Publishes the outbox rows of the topics this process consumes."""

    def __init__(
        self,
        pool: AsyncConnectionPool,
        *,
        queue: Queue | None,
        policy: outbox_sm.OutboxPolicy,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.pool = pool
        self.queue = queue
        self.policy = policy
        #: Launches ``runtime: lambda`` tasks; set by the AWS profile (``None`` in Lite).
        self.launcher: Launcher | None = None
        self._rand = rand

    def consumed_topics(self) -> list[str]:
        """The topics this publisher hands on: ``wake`` with a queue, ``invoke`` with a
        launcher."""
        topics = []
        if self.queue is not None:
            topics.append(WAKE_TOPIC)
        if self.launcher is not None:
            topics.append(INVOKE_TOPIC)
        return topics

    async def publish_once(self) -> int:
        """Publish one batch of due rows of the consumed topics; returns how many were taken.
        Raises ``Unavailable``."""
        topics = self.consumed_topics()
        if not topics:
            return 0
        async with transaction(self.pool) as cur:
            rows = await fetch(
                cur, OutboxRow, Q["claim_outbox"], {"n": self.policy.batch_size, "topics": topics}
            )
            if not rows:
                return 0
            sent, failed = await self._send(rows)
            await record_sends(
                cur, sent, failed, policy=self.policy, rand=self._rand, what="outbox send failed"
            )
            return len(sent)

    async def _send(
        self, rows: Sequence[OutboxRow]
    ) -> tuple[list[OutboxRow], list[tuple[OutboxRow, str]]]:
        """Hand claimed rows to their consumers: ``(sent, [(failed row, why)])``."""
        wakes = [r for r in rows if r.topic == WAKE_TOPIC]
        invokes = [r for r in rows if r.topic == INVOKE_TOPIC]
        sent: list[OutboxRow] = []
        failed: list[tuple[OutboxRow, str]] = []
        if wakes and self.queue is not None:
            try:
                await self.queue.send(
                    [json.dumps({"task_id": t}).encode() for r in wakes for t in woken(r.payload)]
                )
                sent += wakes
            except errors.TraceError as exc:
                failed += [(r, f"{type(exc).__name__}: {exc}") for r in wakes]
        if invokes and self.launcher is not None:
            # runtime: lambda -- the launcher claims and invokes with the full payload
            launcher = self.launcher
            results = await asyncio.gather(
                *(launcher.launch(r.payload["task_id"]) for r in invokes),
                return_exceptions=True,
            )
            for r, res in zip(invokes, results, strict=True):
                if isinstance(res, BaseException):
                    failed.append((r, f"{type(res).__name__}: {res}"))
                else:
                    sent.append(r)
        return sent, failed

    async def run(self, stop: asyncio.Event) -> None:
        """Publish until ``stop`` is set, waking on ``NOTIFY trace_outbox`` or every
        ``policy.poll_s``; failures are logged and retried with backoff (``run_every``)."""
        listener = _Listener(self.pool)

        async def drain_then_wait() -> None:
            while await self.publish_once():
                pass
            await listener.wait(self.policy.poll_s)

        try:
            await run_every(stop, 0.0, drain_then_wait, name="outbox publisher", logger=log)
        finally:
            await listener.close()


def woken(payload: dict[str, Any]) -> list[str]:
    """The tasks a ``wake`` row wakes: ``{"task_id"}``, or ``{"task_ids": [...]}`` (one row per
    DAG fan-out pass, ``trace_lite.dag_runs``); each gets its own queue message."""
    ids = payload.get("task_ids")
    return [str(t) for t in ids] if isinstance(ids, list) else [payload["task_id"]]


class _Listener:
    """A dedicated connection that ``LISTEN``s to ``trace_outbox``, reopened after a failure."""

    def __init__(self, pool: AsyncConnectionPool) -> None:
        self._pool = pool
        self._conn: psycopg.AsyncConnection[Any] | None = None

    async def wait(self, timeout_s: float) -> None:
        """Return at the next notification or after ``timeout_s``. Raises ``Unavailable``."""
        try:
            if self._conn is None or self._conn.closed:
                # The pool's kwargs already carry autocommit=True: passing it twice was a
                # TypeError that once silently killed the publisher task.
                base = self._pool.kwargs if isinstance(self._pool.kwargs, dict) else {}
                kwargs = {**base, "autocommit": True}
                conninfo = self._pool.conninfo
                assert isinstance(conninfo, str)
                self._conn = await psycopg.AsyncConnection.connect(conninfo, **kwargs)
                await self._conn.execute(Q["listen_outbox"])
            async for _ in self._conn.notifies(timeout=timeout_s, stop_after=1):
                pass
        except psycopg.Error as exc:
            await self.close()
            raise errors.Unavailable(f"outbox listener: {type(exc).__name__}") from exc

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None


__all__ = ["Launcher", "OutboxPublisher"]
