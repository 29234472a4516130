"""Buffer queues are created when the DAG declaring their dataset is deployed.

Registering a dataset with ``storage_kind = 'buffered_postgres'`` (a DAG deploy's
``publish`` entry) inserts its row into ``buffer_queues`` in the same transaction (a trigger
on ``datasets``, migration 0019): the queue ``buffer-<dataset_uuid>`` is part of the deploy,
never of a first batch. ``QueueProvisioner.provision_once`` then creates each recorded queue on
the queue backend with the profile's ``create`` (AWS: the SQS queue and its DLQ; Lite: nothing
to create, the Postgres queue table holds every queue) and marks it ``provisioned_at``. A
failed creation backs off (``2**tries`` seconds, at most ``MAX_BACKOFF_S``) and is retried:
creating is idempotent on every backend, so a crash between the creation and the mark only
creates again. The Dispatcher process runs the pass (deploys go through it) and so does each
``trace sink run`` process (``docs/architecture/sinks.md``, ADR 0023).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import attrs
from psycopg_pool import AsyncConnectionPool

from trace_core import errors
from trace_lite import sqlfile
from trace_lite.pg import fetch_as, transaction

log = logging.getLogger("trace.buffer_queues")

Q = sqlfile.load("sink.sql")

#: Longest wait before another try at creating a queue.
MAX_BACKOFF_S = 60.0

#: Creates a queue (and its dead-letter queue) by name on the backend; idempotent.
CreateQueue = Callable[[str], Awaitable[None]]


@attrs.frozen
class _PendingQueue:
    queue: str
    tries: int


@attrs.frozen
class QueueRow:
    """A dataset's buffer queue as ``buffer_queues`` records it."""

    queue: str
    #: Whether the backend queue exists (created by a provisioning pass).
    provisioned: bool
    #: Why the last creation failed, while it is not provisioned.
    last_error: str | None


async def create_nothing(_name: str) -> None:
    """``CreateQueue`` of the Postgres queue: every queue exists in ``queue_messages``."""


async def buffer_queue(pool: AsyncConnectionPool, dataset_uuid: str) -> QueueRow | None:
    """The recorded buffer queue of a dataset (``None``: not a buffered dataset). Raises
    ``Unavailable``."""
    async with transaction(pool) as cur:
        rows = await fetch_as(cur, QueueRow, Q["buffer_queue"], {"dataset_uuid": dataset_uuid})
    return rows[0] if rows else None


class QueueProvisioner:
    """Creates recorded buffer queues on the backend (module docstring)."""

    def __init__(self, pool: AsyncConnectionPool, create: CreateQueue, *, batch: int = 20) -> None:
        self.pool = pool
        self.create = create
        self.batch = batch

    async def provision_once(self) -> int:
        """Create the due queues not created yet; returns how many were created now. A queue
        whose creation fails is retried later (its ``last_error`` says why). Raises
        ``Unavailable`` (the state database)."""
        created = 0
        async with transaction(self.pool) as cur:
            rows = await fetch_as(
                cur, _PendingQueue, Q["claim_unprovisioned_queues"], {"n": self.batch}
            )
            for row in rows:
                try:
                    await self.create(row.queue)
                except errors.TraceError as exc:
                    delay = min(MAX_BACKOFF_S, float(2**row.tries))
                    params = {"queue": row.queue, "delay_s": delay, "error": f"{exc.code}: {exc}"}
                    await cur.execute(Q["queue_provision_failed"], params)
                    log.warning(
                        "buffer queue not created", extra={"queue": row.queue, "why": str(exc)}
                    )
                    continue
                await cur.execute(Q["mark_queue_provisioned"], {"queue": row.queue})
                created += 1
        return created


__all__ = [
    "MAX_BACKOFF_S",
    "CreateQueue",
    "QueueProvisioner",
    "QueueRow",
    "buffer_queue",
    "create_nothing",
]
