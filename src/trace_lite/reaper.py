"""The reaper: the time-driven half of the task lifecycle.

Each pass (``Reaper.reap_once``, every 0.5 s in every Dispatcher process) runs up to four short
transactions, each locking with ``SKIP LOCKED`` and applying the kernel's decision as a CAS, so
any number of reapers may run at once (ADR 0003):

1. attempts whose lease ran out, or that ran past their ``timeout_s`` (leases are capped at it),
   end ``timed_out`` and are retried per policy or failed (``lifecycle.decide_expire``); running
   attempts of canceled tasks whose lease ran out are closed;
2. pending tasks whose backoff elapsed become queued and are woken (``lifecycle.decide_due``);
3. queued tasks nobody claimed for ``rewake_after_s`` get a fresh wake-up (queue mode only: a
   lost wake-up is replaced; wake-ups are hints, so extras are harmless);
4. every 120th pass, published outbox rows older than an hour are deleted.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable

import attrs
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from trace_core import lifecycle
from trace_core.lifecycle import RetryPolicy, TaskEvent, TaskView
from trace_lite.pg import transaction
from trace_lite.task_rows import LockedTask, Q, TaskIdRow, WakeMode, fetch, wake

log = logging.getLogger("trace.reaper")

#: Purge published outbox rows every this many passes.
PURGE_EVERY_PASSES = 120


@attrs.frozen
class ReapReport:
    """What one reaper pass did."""

    expired: int = 0
    due: int = 0
    canceled_closed: int = 0
    rewoken: int = 0


class Reaper:
    """Applies the kernel's time-driven decisions to Postgres state."""

    def __init__(
        self,
        pool: AsyncConnectionPool,
        *,
        retry: RetryPolicy,
        wake_mode: WakeMode,
        rewake_after_s: float = 120.0,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.pool = pool
        self.retry = retry
        self.wake_mode: WakeMode = wake_mode
        #: A queued task unclaimed this long gets a fresh wake-up (its last one was lost).
        self.rewake_after_s = rewake_after_s
        self._rand = rand
        self._passes = 0

    async def reap_once(self, batch: int = 500) -> ReapReport:
        """One pass (see the module docstring). Raises ``Unavailable``."""
        expired, closed = await self._expire(batch)
        due = await self._due(batch)
        rewoken = await self._rewake(batch) if self.wake_mode == "queue" else 0
        self._passes += 1
        if self._passes % PURGE_EVERY_PASSES == 0:
            async with transaction(self.pool) as cur:
                await cur.execute(Q["purge_published_outbox"], {"older_than": "1 hour"})
        for v, d in expired:
            log.info(
                "attempt timed out" if d.event is TaskEvent.TIME_OUT else "attempt expired",
                extra={"task_id": v.task_id, "attempt": v.attempt, "state": d.state.value},
            )
        return ReapReport(expired=len(expired), due=due, canceled_closed=closed, rewoken=rewoken)

    async def _expire(
        self, batch: int
    ) -> tuple[list[tuple[TaskView, lifecycle.ExpireDecision]], int]:
        async with transaction(self.pool) as cur:
            rows = await fetch(cur, LockedTask, Q["lock_expired"], {"n": batch})
            expired: list[tuple[TaskView, lifecycle.ExpireDecision]] = []
            for row in rows:
                view = row.view
                d = lifecycle.decide_expire(view, now=row.now, retry=self.retry, rand=self._rand())
                if d is not None:
                    expired.append((view, d))
            if expired:
                await cur.execute(
                    Q["apply_expiries"],
                    {
                        "task_ids": [v.task_id for v, _ in expired],
                        "attempts": [v.attempt for v, _ in expired],
                        "lease_tokens": [v.lease_token for v, _ in expired],
                        "states": [d.state.value for _, d in expired],
                        "available_ats": [d.available_at for _, d in expired],
                        "finished_ats": [d.finished_at for _, d in expired],
                        "errors": [Jsonb(dict(d.error)) for _, d in expired],
                        "outcomes": [d.attempt_outcome.value for _, d in expired],
                    },
                )
            await cur.execute(Q["expire_canceled_attempts"])
            closed = max(cur.rowcount, 0)
        return expired, closed

    async def _due(self, batch: int) -> int:
        async with transaction(self.pool) as cur:
            rows = await fetch(cur, LockedTask, Q["lock_due"], {"n": batch})
            due = [r.task_id for r in rows if lifecycle.decide_due(r.view, now=r.now)]
            if due:
                await cur.execute(Q["apply_due"], {"task_ids": due})
                await wake(cur, due, self.wake_mode)
        return len(due)

    async def _rewake(self, batch: int) -> int:
        async with transaction(self.pool) as cur:
            rows = await fetch(
                cur,
                TaskIdRow,
                Q["lock_stale_queued"],
                {"older_than": f"{self.rewake_after_s} seconds", "n": batch},
            )
            stale = [r.task_id for r in rows]
            if stale:
                await cur.execute(Q["touch_tasks"], {"task_ids": stale})
                await wake(cur, stale, self.wake_mode)
        return len(stale)


__all__ = ["PURGE_EVERY_PASSES", "ReapReport", "Reaper"]
