"""Group commit for completions: concurrent ``complete`` calls share one transaction.

Theory of operation
-------------------
Every completion must be durable before it is acknowledged (``synchronous_commit = on``), so a
commit costs a WAL flush. ``CompletionBatcher.complete`` submits the request to a
``trace_sdk.aio.Coalescer``, whose single flusher runs ``Dispatcher.complete_many`` over
everything queued at that moment -- one transaction, one flush -- and answers each caller with
its own result. While a flush is in flight, new requests accumulate for the next one, so
batches grow with load and no artificial delay is added when idle.

Nothing about fencing changes: ``complete_many`` locks each task, asks the kernel, and applies
every accepted completion as a compare-and-swap on ``(task_id, attempt, lease_token)``; a
refused request gets its own error while the rest of the batch commits. Two completions of the
same task never share a batch (the coalescer's key is the task id: the second waits for the
next flush, where it is a replay or a conflict exactly as if it had come alone).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

from trace_core import errors, wire
from trace_sdk.aio import Coalescer

log = logging.getLogger("trace.batching")


class _Completer(Protocol):
    async def complete_many(
        self, reqs: list[wire.CompleteRequest]
    ) -> Sequence[wire.CompleteResponse | errors.TraceError]: ...


class CompletionBatcher:
    """Coalesces concurrent completions into ``complete_many`` transactions."""

    def __init__(self, dispatcher: _Completer, *, max_batch: int = 256) -> None:
        self._dispatcher = dispatcher
        self._coalescer: Coalescer[wire.CompleteRequest, wire.CompleteResponse] = Coalescer(
            self._flush, max_batch=max_batch, key=lambda req: req.task_id
        )

    @property
    def batch_sizes(self) -> list[int]:
        """Sizes of the batches flushed so far (for metrics and tests)."""
        return self._coalescer.batch_sizes

    async def complete(self, req: wire.CompleteRequest) -> wire.CompleteResponse:
        """Complete ``req`` in the next group commit. Raises as ``Dispatcher.complete``;
        ``Unavailable`` once closed."""
        return await self._coalescer.submit(req)

    async def close(self) -> None:
        """Commit what was already submitted, then refuse new completions."""
        await self._coalescer.close()

    async def _flush(
        self, reqs: list[wire.CompleteRequest]
    ) -> Sequence[wire.CompleteResponse | errors.TraceError]:
        try:
            return await self._dispatcher.complete_many(reqs)
        except errors.TraceError:
            raise  # the transaction failed: every caller of the batch sees it
        except Exception as exc:
            log.exception("completion batch failed")
            raise errors.Unavailable(f"completion batch failed: {type(exc).__name__}") from exc


__all__ = ["CompletionBatcher"]
