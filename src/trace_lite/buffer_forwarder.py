"""The buffer forwarder: hands buffer-batch announcements to their dataset's buffer queue.

``/v1/task/buffer-publish`` records a batch pointer (``buffer_batches``) and, in the same
transaction, an outbox row of topic ``buffer:<dataset name>``. The forwarder claims those rows
(``FOR UPDATE SKIP LOCKED``: any number of forwarders split them), resolves the dataset in the
producing task's org, and sends one message per batch to the dataset's queue
(``queue_name(dataset_uuid)``, ``buffer-<dataset_uuid>``). A row is marked published only once
its message is sent, as ``trace_core.outbox`` decides; a row naming no buffered dataset (never
deployed, or not ``buffered``) backs off like a failed send and is ``dead`` after
``OutboxPolicy.max_tries``. Each ``trace sink`` process runs a forwarder for the datasets it
serves (``docs/architecture/sinks.md``).

A message is the JSON of ``BufferMessage``. Forwarding is at least once: a crash between the send
and the commit sends the batch again, which the sink's dedupe keys absorb.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

import attrs
from psycopg_pool import AsyncConnectionPool

from trace_core import errors, wire
from trace_core import outbox as outbox_sm
from trace_core.ports import Queue
from trace_core.sink import Scope
from trace_lite import sqlfile
from trace_lite.outbox_publisher import record_sends
from trace_lite.pg import fetch_as, transaction
from trace_lite.pg_wakeups import run_woken

log = logging.getLogger("trace.buffer_forwarder")

Q = sqlfile.load("sink.sql")

#: The outbox topic prefix of buffer-batch announcements (``buffer:<dataset name>``).
TOPIC_PREFIX = "buffer:"
#: The channel a buffer publish notifies at its commit (tasks.sql insert_buffer_announcement).
CHANNEL = "trace_buffer"
#: The registry's storage kind of buffered Postgres datasets.
BUFFERED = "buffered_postgres"


def queue_name(dataset_uuid: str) -> str:
    """The buffer queue of a dataset: ``buffer-<dataset_uuid>`` (a valid SQS queue name too;
    its SQS dead-letter queue is ``buffer-<dataset_uuid>-dlq``)."""
    return f"buffer-{dataset_uuid}"


def topic(dataset: str) -> str:
    """The outbox topic announcing batches of the dataset named ``dataset``."""
    return f"{TOPIC_PREFIX}{dataset}"


@attrs.frozen
class BufferMessage:
    """What a dataset's buffer queue carries: one batch pointer of one attempt."""

    task_id: str
    attempt: int
    batch_key: str
    dataset_uuid: str
    #: The staged object; ``None`` when the rows travel inline (``rows``).
    object_key: str | None
    row_count: int
    byte_size: int
    sha256: str
    #: The batch's scope in its wire form (``wire.BufferScopeIn``); ``None`` for none.
    scope: dict[str, Any] | None = None
    #: Rows published inline; their ``trace_core.sink.inline_lines`` match size and sha256.
    rows: list[Any] | None = None

    def encode(self) -> bytes:
        return json.dumps(attrs.asdict(self), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, body: bytes) -> BufferMessage:
        """Raises ``ValidationFailed`` for a body that is not a buffer message."""
        required = [f for f in attrs.fields(cls) if f.name not in ("scope", "rows", "object_key")]
        try:
            doc = json.loads(body)
            fields: dict[str, Any] = {f.name: doc[f.name] for f in required}
            scope = doc.get("scope")
            rows = doc.get("rows")
            object_key = doc.get("object_key")
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise errors.ValidationFailed(
                f"not a buffer message ({type(exc).__name__})", field="body"
            ) from None
        types = {f.name: f.type for f in required}
        for name, value in fields.items():
            want = int if types[name] in ("int", int) else str
            if not isinstance(value, want) or isinstance(value, bool):
                raise errors.ValidationFailed(f"{name} must be {want.__name__}", field=name)
        if scope is not None:
            try:
                wire.structure(scope, wire.BufferScopeIn)
            except errors.InvalidRequest as exc:
                raise errors.ValidationFailed(exc.message, field=f"scope.{exc.field}") from None
        if rows is None and not isinstance(object_key, str):
            raise errors.ValidationFailed("object_key must be str", field="object_key")
        if rows is not None and (not isinstance(rows, list) or object_key is not None):
            raise errors.ValidationFailed("rows must be a list, with no object_key", field="rows")
        return cls(**fields, object_key=object_key, scope=scope, rows=rows)

    def dedupe_scope(self) -> Scope | None:
        """The scope as ``trace_core.sink`` folds it into dedupe keys."""
        if self.scope is None:
            return None
        s = wire.structure(self.scope, wire.BufferScopeIn)
        span = (s.range.start, s.range.end) if s.range is not None else None
        return Scope(cursor=s.cursor, partition_key=s.partition_key, range=span)


@attrs.frozen
class AnnouncementRow:
    id: int
    tries: int
    now: datetime
    task_id: str | None
    batch_key: str | None
    attempt: int | None
    object_key: str | None
    row_count: int | None
    byte_size: int | None
    sha256: str | None
    scope: dict[str, Any] | None
    inline_rows: str | None
    dataset: str | None
    dataset_uuid: str | None
    storage_kind: str | None


class BufferForwarder:
    """Forwards announcements of ``topics`` to dataset queues made by ``queue_for``."""

    def __init__(
        self,
        pool: AsyncConnectionPool,
        queue_for: Callable[[str], Queue],
        *,
        topics: Sequence[str],
        policy: outbox_sm.OutboxPolicy | None = None,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.pool = pool
        self.queue_for = queue_for
        self.topics = list(topics)
        self.policy = policy or outbox_sm.OutboxPolicy()
        self._rand = rand

    async def forward_once(self) -> int:
        """Forward one batch of due announcements; returns how many were sent.
        Raises ``Unavailable``."""
        if not self.topics:
            return 0
        async with transaction(self.pool) as cur:
            rows = await fetch_as(
                cur,
                AnnouncementRow,
                Q["claim_buffer_outbox"],
                {"topics": self.topics, "n": self.policy.batch_size},
            )
            if not rows:
                return 0
            sent, failed = await self._send(rows)
            await record_sends(
                cur,
                sent,
                failed,
                policy=self.policy,
                rand=self._rand,
                what="buffer announcements not forwarded",
                logger=log,
            )
            return len(sent)

    async def _send(
        self, rows: Sequence[AnnouncementRow]
    ) -> tuple[list[AnnouncementRow], list[tuple[AnnouncementRow, str]]]:
        by_queue: dict[str, list[tuple[AnnouncementRow, BufferMessage]]] = {}
        failed: list[tuple[AnnouncementRow, str]] = []
        for r in rows:
            if r.task_id is None or r.attempt is None:
                failed.append((r, "no buffer batch recorded for this announcement"))
                continue
            if r.dataset_uuid is None or r.storage_kind != BUFFERED:
                failed.append((r, f"no buffered dataset {r.dataset!r} in the producer's org"))
                continue
            message = BufferMessage(
                task_id=r.task_id,
                attempt=r.attempt,
                batch_key=str(r.batch_key),
                dataset_uuid=r.dataset_uuid,
                object_key=r.object_key,
                row_count=int(r.row_count or 0),
                byte_size=int(r.byte_size or 0),
                sha256=str(r.sha256),
                scope=r.scope,
                rows=None
                if r.inline_rows is None
                else [json.loads(line) for line in r.inline_rows.splitlines()],
            )
            by_queue.setdefault(r.dataset_uuid, []).append((r, message))
        sent: list[AnnouncementRow] = []
        for dataset_uuid, items in by_queue.items():
            try:
                await self.queue_for(dataset_uuid).send([m.encode() for _, m in items])
                sent += [r for r, _ in items]
            except errors.TraceError as exc:
                failed += [(r, f"{type(exc).__name__}: {exc}") for r, _ in items]
        return sent, failed

    async def drain(self) -> int:
        """Forward until nothing is due; returns how many were sent."""
        total = 0
        while n := await self.forward_once():
            total += n
        return total

    async def run(self, stop: asyncio.Event, *, every_s: float = 0.2) -> None:
        """Forward until ``stop`` is set: drain, then wait for ``NOTIFY trace_buffer`` (sent at
        the commit of every buffer publish) or ``every_s``, whichever comes first."""
        await run_woken(
            stop,
            self.pool.conninfo,
            CHANNEL,
            every_s,
            self.drain,
            name="buffer forwarder",
            logger=log,
        )


__all__ = [
    "BUFFERED",
    "CHANNEL",
    "TOPIC_PREFIX",
    "BufferForwarder",
    "BufferMessage",
    "queue_name",
    "topic",
]
