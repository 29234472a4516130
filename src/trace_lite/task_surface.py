"""``InProcessTaskSurface``: the ``TaskSurface`` port on a Dispatcher in the same process.

A worker that runs next to its Dispatcher (tests, benchmarks, a single-process deployment)
calls the Dispatcher through this adapter instead of over HTTP. It keeps the HTTP surface's
rules: claim ids are validated like ``/internal/task-claim`` bodies, every attempt call
verifies the attempt's capability token against its fence first (``Dispatcher.authorize``),
and completions share group commits through a ``CompletionBatcher``. Errors are the
Dispatcher's ``trace_core.errors`` classes, unchanged.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from trace_core import errors, wire
from trace_lite.batching import CompletionBatcher
from trace_lite.dispatcher import Dispatcher


class InProcessTaskSurface:
    """The task surface of ``dispatcher``, called in-process (see the module docstring)."""

    def __init__(self, dispatcher: Dispatcher, *, batcher: CompletionBatcher | None = None) -> None:
        self.dispatcher = dispatcher
        self._batcher = batcher or CompletionBatcher(dispatcher)

    async def close(self) -> None:
        """Commit the completions already submitted."""
        await self._batcher.close()

    async def claim_many(self, task_ids: Sequence[str], worker_id: str) -> wire.ClaimBatchResponse:
        req = wire.structure(
            {"task_ids": list(task_ids), "worker_id": worker_id}, wire.ClaimBatchRequest
        )
        return await self.dispatcher.claim_many(req.task_ids, req.worker_id)

    async def fetch(self, task_id: str, attempt: int | None = None) -> wire.TaskPayload:
        return await self.dispatcher.fetch(task_id, attempt)

    async def heartbeat(
        self, capability_token: str, req: wire.HeartbeatRequest
    ) -> wire.HeartbeatResponse:
        await self.dispatcher.authorize(capability_token, req.task_id, req.attempt)
        return await self.dispatcher.heartbeat(req)

    async def events(self, capability_token: str, req: wire.EventsRequest) -> wire.EventsResponse:
        await self.dispatcher.authorize(capability_token, req.task_id, req.attempt)
        return await self.dispatcher.emit_events(req)

    async def buffer_publish(
        self, capability_token: str, req: wire.BufferPublishRequest
    ) -> wire.BufferPublishResponse:
        await self.dispatcher.authorize(capability_token, req.task_id, req.attempt)
        return await self.dispatcher.publish_buffer(req)

    async def complete(
        self, capability_token: str, req: wire.CompleteRequest
    ) -> wire.CompleteResponse:
        await self.dispatcher.authorize(capability_token, req.task_id, req.attempt)
        return await self._batcher.complete(req)

    async def complete_batch(
        self, items: Sequence[wire.TokenedCompletion]
    ) -> list[wire.CompleteResponse | errors.TraceError]:
        async def one(item: wire.TokenedCompletion) -> wire.CompleteResponse | errors.TraceError:
            try:
                return await self.complete(item.capability_token, item.completion)
            except errors.TraceError as exc:
                return exc

        # concurrent, so the items share group commits
        return list(await asyncio.gather(*(one(item) for item in items)))


__all__ = ["InProcessTaskSurface"]
