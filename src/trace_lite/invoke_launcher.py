"""The one launcher of ``runtime: lambda`` tasks, over an ``Invoker`` port.

Theory of operation
-------------------

* ``InvokeLauncher.launch(task_id)`` claims the task through the Dispatcher (a normal attempt
  with a lease, leased to the invoker's ``worker_id``), fetches its payload, presigns its
  bundle URL, builds the event with ``trace_core.udf.invoke_payload`` and hands it to the
  invoker.
* An invoke failure is logged, not raised: nothing is undone, the attempt never heartbeats, its
  lease expires and the reaper retries the task with backoff exactly as for a worker that
  died -- one retry mechanism for every runtime.
* Invokers differ only in where the event goes: ``trace_aws.lambda_invoker.LambdaInvoker``
  (Lambda's Invoke, ``InvocationType=Event``) and ``trace_lite.udf.launcher.RunnerInvoker``
  (the Lite runner's Lambda-style Invoke path). Both encode the event with ``event_body``, so
  the size limit is checked the same way.

Lives in ``trace_lite`` (the Dispatcher library) and imports only the kernel, so
``trace_aws`` can import it without pulling in any other Lite adapter.
"""

from __future__ import annotations

import json
import logging
from typing import Final, Protocol

from trace_core import errors, udf, wire
from trace_core.ports import ObjectStore

log = logging.getLogger("trace.launcher")

#: Lambda's asynchronous invocation payload limit; the Lite runner keeps the same one.
MAX_EVENT_PAYLOAD: Final = 256 * 1024


class Invoker(Protocol):
    """Sends one attempt's event to where ``runtime: lambda`` handlers run."""

    @property
    def worker_id(self) -> str:
        """Who the claimed attempt is leased to (e.g. ``lambda:<function name>``)."""
        ...

    async def invoke(self, payload: wire.LambdaInvokePayload) -> None:
        """Hand the event over; returns once the target accepted it (asynchronous invoke: the
        handler's answer comes back through the Dispatcher, not here). Raises
        ``PayloadTooLarge``, ``Unavailable`` (unreachable, or it did not accept), and any other
        ``TraceError`` the target reports (``NotFound``, ``Forbidden``)."""
        ...


class ClaimingDispatcher(Protocol):
    """What the launcher calls on the Dispatcher (``trace_lite.tasks.Dispatcher``)."""

    async def claim(self, task_id: str, worker_id: str) -> wire.ClaimResponse: ...

    async def fetch(self, task_id: str, attempt: int | None = None) -> wire.TaskPayload: ...


def event_body(payload: wire.LambdaInvokePayload) -> bytes:
    """The event's JSON bytes. Raises ``PayloadTooLarge`` above ``MAX_EVENT_PAYLOAD``."""
    body = json.dumps(wire.unstructure(payload), separators=(",", ":")).encode()
    if len(body) > MAX_EVENT_PAYLOAD:
        raise errors.PayloadTooLarge("invoke event payloads are limited to 256 KiB")
    return body


class InvokeLauncher:
    """Claims a task's attempt through the Dispatcher and hands its event to an ``Invoker``."""

    def __init__(
        self,
        dispatcher: ClaimingDispatcher,
        invoker: Invoker,
        store: ObjectStore,
        *,
        bundle_url_ttl_s: int = 900,
    ) -> None:
        self.dispatcher = dispatcher
        self.invoker = invoker
        self.store = store
        self.bundle_url_ttl_s = bundle_url_ttl_s

    async def launch(self, task_id: str) -> wire.ClaimResponse | None:
        """Claim and invoke. Returns the claim, or None when the task was not claimable.

        An invoke failure is logged, not raised (the attempt times out and is retried).
        Raises ``Unavailable`` only if the claim itself failed.
        """
        try:
            claim = await self.dispatcher.claim(task_id, self.invoker.worker_id)
        except (errors.TaskNotClaimable, errors.TaskCanceled, errors.NotFound):
            return None
        try:
            task = await self.dispatcher.fetch(task_id, claim.attempt)
            bundle_url = await self.store.signed_url(
                udf.bundle_key(task), method="GET", expires_in=self.bundle_url_ttl_s
            )
            await self.invoker.invoke(udf.invoke_payload(task, claim, bundle_url))
        except errors.TraceError as exc:
            log.warning(
                "invoke failed; the attempt will time out and be retried",
                extra={
                    "task_id": task_id,
                    "attempt": claim.attempt,
                    "worker_id": self.invoker.worker_id,
                    "error": str(exc),
                },
            )
        return claim


__all__ = ["MAX_EVENT_PAYLOAD", "ClaimingDispatcher", "InvokeLauncher", "Invoker", "event_body"]
