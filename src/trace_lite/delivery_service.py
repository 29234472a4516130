"""The Delivery Service loop: reap lapsed leases, lease due deliveries, send them, record.

One pass (``run_once``) expires in-flight deliveries whose lease lapsed, leases up to
``batch`` due deliveries (``SKIP LOCKED``: run more processes to send more), sends them
concurrently and records each result under its fence. A result that comes back after the
lease lapsed is dropped by the store (``LeaseLost``): the next attempt carries the same
``webhook-id``, so a receiver that dedupes sees one alert.

``run`` repeats passes until ``stop`` is set, sleeping ``poll_s`` after a pass that found
nothing to do.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import attrs

from trace_core import errors
from trace_core.delivery import DeliveryState
from trace_lite.delivery import DeliveryStore, Leased
from trace_lite.webhook_sender import WebhookSender

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
    ) -> None:
        self.store = store
        self.sender = sender
        self.sender_id = sender_id
        self.batch = batch
        self.poll_s = poll_s
        self._fault = fault

    async def _deliver(self, leased: Leased, stats: PassStats) -> None:
        started = time.monotonic()
        result = await self.sender.send(leased)
        latency_ms = int((time.monotonic() - started) * 1000)
        if self._fault is not None:
            await self._fault("after_send")
        try:
            state = await self.store.record(leased.fence, result, latency_ms=latency_ms)
        except errors.LeaseLost:
            stats.lost += 1
            log.warning(
                "delivery result after the lease lapsed; dropped",
                extra={"delivery_id": leased.fence.delivery_id, "attempt": leased.fence.attempt},
            )
            return
        if state is DeliveryState.SENT:
            stats.sent += 1
        log.info(
            "delivery attempt",
            extra={
                "delivery_id": leased.fence.delivery_id,
                "attempt": leased.fence.attempt,
                "outcome": result.event.value,
                "status_code": result.status_code,
                "state": state.value,
                "error": result.error,
            },
        )

    async def run_once(self) -> PassStats:
        stats = PassStats()
        stats.reaped = await self.store.reap()
        leased = await self.store.lease(self.batch, sender=self.sender_id)
        stats.leased = len(leased)
        results = await asyncio.gather(
            *(self._deliver(item, stats) for item in leased), return_exceptions=True
        )
        for result in results:
            if isinstance(result, errors.TraceError):
                # the send happened or not; the lease will lapse and the reaper retries it
                log.warning("recording a delivery failed", extra={"error": result.message})
            elif isinstance(result, BaseException):
                raise result
        return stats

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                stats = await self.run_once()
            except errors.TraceError as exc:
                log.warning("delivery pass failed; retrying", extra={"error": exc.message})
                stats = PassStats()
            if stats.leased == 0:
                try:
                    await asyncio.wait_for(stop.wait(), self.poll_s)
                except TimeoutError:
                    pass


__all__ = ["FAULT_POINTS", "DeliveryService", "PassStats"]
