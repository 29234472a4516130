"""The Delivery Service loop: reap lapsed leases, lease due deliveries, send them, record.

One pass (``run_once``) expires in-flight deliveries whose lease lapsed, leases up to
``batch`` due deliveries (``SKIP LOCKED``: run more processes to send more), sends them
concurrently and records every result under its fence in one transaction
(``DeliveryStore.record_many``: one commit per pass; each send is bounded by the HTTP timeout,
well inside the lease). A result that comes back after the lease lapsed is dropped by the
store: the next attempt carries the same ``webhook-id``, so a receiver that dedupes sees one
alert. If the recording transaction fails, the leases lapse and the reaper makes the
deliveries due again.

``run`` repeats passes until ``stop`` is set. After a pass that found nothing to do it waits
for a wake-up (``DeliveryWakeups``: ``NOTIFY trace_delivery`` when deliveries become due, sent
at the commit that made them due) or ``poll_s``, whichever comes first; without wake-ups it
sleeps ``poll_s``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import attrs

from trace_core import errors
from trace_core.delivery import DeliveryState
from trace_lite.delivery import DeliveryStore, Leased, Outcome
from trace_lite.delivery_wakeups import DeliveryWakeups
from trace_lite.webhook_sender import WebhookSender
from trace_sdk.aio import sleep_or_stop

log = logging.getLogger("trace.delivery")

#: Where a test can stop the process (``fault``): after the receiver answered, before the
#: result is recorded -- the crash that leaves a sent webhook with its delivery in flight.
FAULT_POINTS = ("after_send",)


@attrs.define
class PassStats:
    """What one pass did."""

    reaped: int = 0
    leased: int = 0
    sent: int = 0
    lost: int = 0


class DeliveryService:
    def __init__(
        self,
        store: DeliveryStore,
        sender: WebhookSender,
        *,
        sender_id: str,
        batch: int = 20,
        poll_s: float = 1.0,
        fault: Callable[[str], Awaitable[None]] | None = None,
        wakeups: DeliveryWakeups | None = None,
    ) -> None:
        self.store = store
        self.sender = sender
        self.sender_id = sender_id
        self.batch = batch
        self.poll_s = poll_s
        self._fault = fault
        self.wakeups = wakeups

    async def _send(self, leased: Leased) -> Outcome:
        started = time.monotonic()
        result = await self.sender.send(leased)
        latency_ms = int((time.monotonic() - started) * 1000)
        if self._fault is not None:
            await self._fault("after_send")
        return Outcome(leased.fence, result, latency_ms)

    async def run_once(self) -> PassStats:
        stats = PassStats()
        stats.reaped = await self.store.reap()
        leased = await self.store.lease(self.batch, sender=self.sender_id)
        stats.leased = len(leased)
        if not leased:
            return stats
        outcomes = await asyncio.gather(*(self._send(item) for item in leased))
        try:
            states = await self.store.record_many(outcomes)
        except errors.TraceError as exc:
            # the sends happened or not; the leases will lapse and the reaper retries them
            log.warning("recording a pass's deliveries failed", extra={"error": exc.message})
            return stats
        for outcome, state in zip(outcomes, states, strict=True):
            fence, result = outcome.fence, outcome.result
            if state is None:
                stats.lost += 1
                log.warning(
                    "delivery result after the lease lapsed; dropped",
                    extra={"delivery_id": fence.delivery_id, "attempt": fence.attempt},
                )
                continue
            if state is DeliveryState.SENT:
                stats.sent += 1
            log.info(
                "delivery attempt",
                extra={
                    "delivery_id": fence.delivery_id,
                    "attempt": fence.attempt,
                    "outcome": result.event.value,
                    "status_code": result.status_code,
                    "state": state.value,
                    "error": result.error,
                },
            )
        return stats

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            if self.wakeups is not None:
                self.wakeups.clear()  # before the pass: what becomes due during it wakes the wait
            try:
                stats = await self.run_once()
            except errors.TraceError as exc:
                log.warning("delivery pass failed; retrying", extra={"error": exc.message})
                await sleep_or_stop(stop, self.poll_s)  # not at a wake-up: the database failed
                continue
            if stats.leased == 0:
                await self._idle(stop)

    async def _idle(self, stop: asyncio.Event) -> None:
        """Until ``stop`` is set, a wake-up arrives or ``poll_s`` passes."""
        if self.wakeups is None:
            await sleep_or_stop(stop, self.poll_s)
        else:
            await self.wakeups.wait_or_stop(stop, self.poll_s)


__all__ = ["FAULT_POINTS", "DeliveryService", "PassStats"]
