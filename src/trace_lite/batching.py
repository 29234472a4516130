"""Group commit for completions: concurrent ``complete`` calls share one transaction.

Theory of operation
-------------------
Every completion must be durable before it is acknowledged (``synchronous_commit = on``), so a
commit costs a WAL flush. ``CompletionBatcher.complete`` queues the request and wakes one
flusher task; the flusher yields once to the event loop (so requests arriving in the same tick
join), then runs ``Dispatcher.complete_many`` over everything queued -- one transaction, one
flush -- and answers each caller with its own result. While a flush is in flight, new requests
accumulate for the next one, so batches grow with load and no artificial delay is added when
idle.

Nothing about fencing changes: ``complete_many`` locks each task, asks the kernel, and applies
every accepted completion as a compare-and-swap on ``(task_id, attempt, lease_token)``; a
refused request gets its own error while the rest of the batch commits. Two completions of the
same task never share a batch (the second waits for the next flush, where it is a replay or a
conflict exactly as if it had come alone).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Protocol

from trace_core import errors, wire

log = logging.getLogger("trace.batching")


class _Completer(Protocol):
    async def complete_many(
        self, reqs: list[wire.CompleteRequest]
    ) -> list[wire.CompleteResponse | errors.TraceError]: ...


class CompletionBatcher:
    """Coalesces concurrent completions into ``complete_many`` transactions."""

    def __init__(self, dispatcher: _Completer, *, max_batch: int = 256) -> None:
        self._dispatcher = dispatcher
        self._max_batch = max_batch
        self._pending: list[tuple[wire.CompleteRequest, asyncio.Future[wire.CompleteResponse]]] = []
        self._wake = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        #: Sizes of the batches flushed so far (for metrics and tests).
        self.batch_sizes: list[int] = []

    async def complete(self, req: wire.CompleteRequest) -> wire.CompleteResponse:
        """Complete ``req`` in the next group commit. Raises as ``Dispatcher.complete``."""
        fut: asyncio.Future[wire.CompleteResponse] = asyncio.get_running_loop().create_future()
        self._pending.append((req, fut))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._run())
        self._wake.set()
        return await fut

    async def close(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        for _, fut in self._pending:
            if not fut.done():
                fut.set_exception(errors.Unavailable("dispatcher shutting down"))
        self._pending.clear()

    def _take_batch(
        self,
    ) -> list[tuple[wire.CompleteRequest, asyncio.Future[wire.CompleteResponse]]]:
        batch, rest, seen = [], [], set()
        for item in self._pending:
            req, fut = item
            if fut.done():  # the caller went away (request canceled)
                continue
            if req.task_id in seen or len(batch) >= self._max_batch:
                rest.append(item)
            else:
                seen.add(req.task_id)
                batch.append(item)
        self._pending = rest
        return batch

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(0)  # let requests of the same tick join this batch
            while self._pending:
                batch = self._take_batch()
                if not batch:
                    continue
                self.batch_sizes.append(len(batch))
                try:
                    results = await self._dispatcher.complete_many([r for r, _ in batch])
                except Exception as exc:  # the transaction failed: every caller sees it
                    err = (
                        exc
                        if isinstance(exc, errors.TraceError)
                        else errors.Unavailable(f"completion batch failed: {type(exc).__name__}")
                    )
                    if not isinstance(exc, errors.TraceError):
                        log.exception("completion batch failed")
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(err)
                    continue
                for (_, fut), res in zip(batch, results, strict=True):
                    if fut.done():
                        continue
                    if isinstance(res, errors.TraceError):
                        fut.set_exception(res)
                    else:
                        fut.set_result(res)


__all__ = ["CompletionBatcher"]
