"""``FakeTaskSurface``: a ``TaskSurface`` built from one function, for worker tests.

Modelled on httpx's ``MockTransport``: every call becomes a ``TaskCall`` (the request record and
the capability token it carries) handed to ``handler``, which returns the response record or
raises a ``trace_core.errors`` class. The handler may be a plain or an ``async`` function.

- ``claim_many`` hands over a ``wire.ClaimBatchRequest``, ``fetch`` a ``FetchRequest``, the
  attempt calls their ``wire`` request (``HeartbeatRequest``, ``EventsRequest``,
  ``BufferPublishRequest``, ``CompleteRequest``) with the token;
- ``complete_batch`` calls the handler once per item (a ``CompleteRequest`` with that item's
  token), so a handler only ever sees single completions; an error raised for one item is that
  item's result;
- a handler that returns the wrong record type is a bug in the test: ``TypeError``.

Every call is recorded in ``calls`` in order, for assertions.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import attrs

from trace_core import errors, wire

T = TypeVar("T")


@attrs.frozen
class FetchRequest:
    """The request record of ``TaskSurface.fetch``."""

    task_id: str
    attempt: int | None = None


@attrs.frozen
class TaskCall:
    """One call of the task surface, as the handler sees it."""

    #: The request record (see the module docstring for which one each method sends).
    request: Any
    #: The attempt's capability token (None for ``claim_many`` and ``fetch``).
    capability_token: str | None = None


Handler = Callable[[TaskCall], Any | Awaitable[Any]]


class FakeTaskSurface:
    """A ``trace_core.ports.TaskSurface`` whose every call is answered by ``handler``."""

    def __init__(self, handler: Handler) -> None:
        self._handler = handler
        #: Every call so far, in order.
        self.calls: list[TaskCall] = []

    async def _call(self, call: TaskCall, expect: type[T]) -> T:
        self.calls.append(call)
        response = self._handler(call)
        if inspect.isawaitable(response):
            response = await response
        if not isinstance(response, expect):
            raise TypeError(
                f"handler answered {type(call.request).__name__} with "
                f"{type(response).__name__}, expected {expect.__name__}"
            )
        return response

    async def claim_many(self, task_ids: Sequence[str], worker_id: str) -> wire.ClaimBatchResponse:
        req = wire.structure(
            {"task_ids": list(task_ids), "worker_id": worker_id}, wire.ClaimBatchRequest
        )
        return await self._call(TaskCall(req), wire.ClaimBatchResponse)

    async def fetch(self, task_id: str, attempt: int | None = None) -> wire.TaskPayload:
        return await self._call(TaskCall(FetchRequest(task_id, attempt)), wire.TaskPayload)

    async def heartbeat(
        self, capability_token: str, req: wire.HeartbeatRequest
    ) -> wire.HeartbeatResponse:
        return await self._call(TaskCall(req, capability_token), wire.HeartbeatResponse)

    async def events(self, capability_token: str, req: wire.EventsRequest) -> wire.EventsResponse:
        return await self._call(TaskCall(req, capability_token), wire.EventsResponse)

    async def buffer_publish(
        self, capability_token: str, req: wire.BufferPublishRequest
    ) -> wire.BufferPublishResponse:
        return await self._call(TaskCall(req, capability_token), wire.BufferPublishResponse)

    async def complete(
        self, capability_token: str, req: wire.CompleteRequest
    ) -> wire.CompleteResponse:
        return await self._call(TaskCall(req, capability_token), wire.CompleteResponse)

    async def complete_batch(
        self, items: Sequence[wire.TokenedCompletion]
    ) -> list[wire.CompleteResponse | errors.TraceError]:
        results: list[wire.CompleteResponse | errors.TraceError] = []
        for item in items:
            try:
                results.append(await self.complete(item.capability_token, item.completion))
            except errors.TraceError as exc:
                results.append(exc)
        return results


__all__ = ["FakeTaskSurface", "FetchRequest", "Handler", "TaskCall"]
