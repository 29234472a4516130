"""Background upkeep of dataset storage: promotion of committed partitions, staging cleanup.

Promotion makes committed bytes readable: it reads each ``committed`` partition's staged bytes,
checks them against what the completion committed (``trace_core.commit.promotion_event``), and
either copies them to the canonical key under the version prefix (``promoted``: readers are
handed only these) or marks the partition ``corrupt`` — an alarm, logged once at error level,
counted by ``partition_counts``, never retried and never readable.

A completion that commits outputs notifies ``trace_dataset_partitions`` (delivered at its
commit); the background pass listens and promotes at once instead of waiting for its timer, so a
reader sees a committed partition as ``pending`` only briefly. The notification is a hint: the
timer still runs, and a lost listener connection is reopened.

The staging sweep deletes what attempts left under their staging prefix once they finished
more than a grace ago (objects no partition names were never visible); an attempt whose
committed partitions still wait for promotion is skipped and revisited. Each attempt is swept
once (``staging_sweeps``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import logging
from typing import Any

import attrs
import psycopg
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from trace_core import commit, errors
from trace_core.commit import PartitionState
from trace_core.object_keys import staging_prefix
from trace_core.ports import ObjectInfo, ObjectStore
from trace_lite import sqlfile
from trace_lite.pg import fetch_as, transaction

log = logging.getLogger("trace.datasets")

Q = sqlfile.load("dataset_gc.sql")

#: Default grace before a finished attempt's staging prefix is cleaned.
DEFAULT_STAGING_GRACE_S = 3600.0
#: The channel a completion that committed partitions notifies (``outputs.sql``).
COMMITTED_CHANNEL = "trace_dataset_partitions"
_RECONNECT_S = 1.0


@attrs.frozen
class SweepReport:
    attempts: int = 0
    deleted_objects: int = 0
    skipped: int = 0


@attrs.frozen
class UnpromotedRow:
    partition_id: int
    dataset_version: str
    task_id: str
    attempt: int
    #: The canonical key promotion copies to.
    object_key: str
    staged_key: str
    #: What the completion committed.
    size: int
    sha256: str


@attrs.frozen
class MarkedRow:
    partition_id: int


@attrs.frozen
class CountRow:
    state: str
    n: int


@attrs.frozen
class AttemptRow:
    task_id: str
    attempt: int
    org_id: str


@attrs.frozen
class WaitingRow:
    waiting: bool


class DatasetGC:
    """Promotion and staging cleanup over one object store."""

    def __init__(self, pool: AsyncConnectionPool, object_store: ObjectStore | None) -> None:
        self.pool = pool
        self.object_store = object_store
        #: Set while ``run_background`` listens for committed partitions.
        self.listening = asyncio.Event()

    async def promote_once(self, batch: int = 200) -> int:
        """Verify up to ``batch`` committed partitions and copy them to their canonical keys;
        mark the ones whose staged bytes changed or vanished ``corrupt`` (logged once).
        Returns how many were promoted. Raises ``Unavailable``."""
        if self.object_store is None:
            return 0
        store = self.object_store
        async with transaction(self.pool) as cur:
            rows = await fetch_as(cur, UnpromotedRow, Q["unpromoted"], {"n": batch})
        promoted: list[int] = []
        corrupt: dict[int, tuple[UnpromotedRow, ObjectInfo | None]] = {}
        for p in rows:
            try:
                data: bytes | None = await store.get(p.staged_key)
            except errors.NotFound:
                data = None
            staged = (
                None
                if data is None
                else ObjectInfo(p.staged_key, len(data), hashlib.sha256(data).hexdigest())
            )
            event = commit.promotion_event(p.size, p.sha256, staged)
            match commit.partition_target(PartitionState.COMMITTED, event):
                case PartitionState.PROMOTED if data is not None:
                    await store.put(p.object_key, data)
                    promoted.append(p.partition_id)
                case _:
                    corrupt[p.partition_id] = (p, staged)
        marked: list[MarkedRow] = []
        async with transaction(self.pool) as cur:
            if promoted:
                await cur.execute(Q["mark_promoted"], {"ids": promoted})
            if corrupt:
                marked = await fetch_as(cur, MarkedRow, Q["mark_corrupt"], {"ids": list(corrupt)})
        for m in marked:
            p, found = corrupt[m.partition_id]
            log.error(
                "committed partition is corrupt: its staged bytes do not match the commit",
                extra={
                    "partition_id": p.partition_id,
                    "dataset_version": p.dataset_version,
                    "task_id": p.task_id,
                    "attempt": p.attempt,
                    "staged_key": p.staged_key,
                    "expected_size": p.size,
                    "expected_sha256": p.sha256,
                    "found_size": None if found is None else found.size,
                    "found_sha256": None if found is None else found.sha256,
                },
            )
        return len(promoted)

    async def partition_counts(self) -> dict[str, int]:
        """Partitions by ``PartitionState`` (``corrupt`` > 0 is an alarm). Raises
        ``Unavailable``."""
        async with transaction(self.pool) as cur:
            rows = await fetch_as(cur, CountRow, Q["partition_counts"], {})
        found = {r.state: r.n for r in rows}
        return {s.value: found.get(s.value, 0) for s in PartitionState}

    async def clean_staging(
        self, *, grace_s: float = DEFAULT_STAGING_GRACE_S, batch: int = 200
    ) -> SweepReport:
        """Delete staged objects of attempts that finished more than ``grace_s`` ago.

        Objects of an attempt that never committed are never visible (no partition names
        them); an attempt whose committed partitions are not promoted yet is skipped and
        revisited later. Each attempt is cleaned once. Returns the counts. Raises
        ``Unavailable``."""
        if self.object_store is None:
            raise errors.Unavailable("no object store to clean")
        report = SweepReport()
        async with transaction(self.pool) as cur:
            params = {"grace_s": grace_s, "n": batch}
            attempts = await fetch_as(cur, AttemptRow, Q["unswept_attempts"], params)
        for a in attempts:
            fence = {"task_id": a.task_id, "attempt": a.attempt}
            async with transaction(self.pool) as cur:
                (w,) = await fetch_as(cur, WaitingRow, Q["unpromoted_of_attempt"], fence)
            if w.waiting:
                report = attrs.evolve(report, skipped=report.skipped + 1)
                continue
            objects = await self.object_store.list(staging_prefix(a.org_id, a.task_id, a.attempt))
            for info in objects:
                await self.object_store.delete(info.key)
            async with transaction(self.pool) as cur:
                await cur.execute(Q["record_sweep"], {**fence, "deleted": len(objects)})
            report = attrs.evolve(
                report,
                attempts=report.attempts + 1,
                deleted_objects=report.deleted_objects + len(objects),
            )
        return report

    async def run_background(
        self, stop: asyncio.Event, *, every_s: float = 5.0, grace_s: float = DEFAULT_STAGING_GRACE_S
    ) -> None:
        """Promote committed partitions and sweep staging until ``stop`` is set: a pass every
        ``every_s`` seconds, and one as soon as a completion commits partitions."""
        wake = asyncio.Event()
        listener = asyncio.create_task(self._listen(wake))
        try:
            while not stop.is_set():
                wake.clear()
                try:
                    while await self.promote_once():
                        pass
                    if self.object_store is not None:
                        await self.clean_staging(grace_s=grace_s)
                except errors.TraceError as exc:
                    log.warning("dataset background pass failed", extra={"error": str(exc)})
                except Exception:  # a bug must not stop the sweep: log it, keep going
                    log.exception("dataset background pass crashed")
                waits = [asyncio.ensure_future(e.wait()) for e in (stop, wake)]
                try:
                    await asyncio.wait(waits, timeout=every_s, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for w in waits:
                        w.cancel()
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener

    async def _listen(self, wake: asyncio.Event) -> None:
        """Set ``wake`` on every ``COMMITTED_CHANNEL`` notification; reconnect on failure."""
        while True:
            try:
                conninfo, kwargs = await self._connection_params()
                async with await psycopg.AsyncConnection.connect(
                    conninfo, **{**kwargs, "autocommit": True}
                ) as conn:
                    await conn.execute(
                        sql.SQL("LISTEN {}").format(sql.Identifier(COMMITTED_CHANNEL))
                    )
                    self.listening.set()
                    async for _ in conn.notifies():
                        wake.set()
            except (OSError, psycopg.Error) as exc:
                log.info("dataset promotion listener reconnecting", extra={"error": str(exc)})
            finally:
                self.listening.clear()
            await asyncio.sleep(_RECONNECT_S)

    async def _connection_params(self) -> tuple[str, dict[str, Any]]:
        """The pool's connection parameters (psycopg_pool accepts callables for both)."""
        conninfo: Any = self.pool.conninfo
        kwargs: Any = self.pool.kwargs
        if callable(conninfo):
            conninfo = conninfo()
            if inspect.isawaitable(conninfo):
                conninfo = await conninfo
        if callable(kwargs):
            kwargs = kwargs()
            if inspect.isawaitable(kwargs):
                kwargs = await kwargs
        return str(conninfo), dict(kwargs or {})


__all__ = ["COMMITTED_CHANNEL", "DEFAULT_STAGING_GRACE_S", "DatasetGC", "SweepReport"]
