"""``runtime: lambda`` tasks: the Dispatcher claims the attempt and invokes the function.

Theory of operation
-------------------

* ``LambdaInvoker`` sends one ``wire.LambdaInvokePayload`` (the ``/internal/task-fetch`` payload
  plus the attempt's capability token, lease token, lease expiry and a presigned bundle URL)
  with ``InvocationType=Event``. ``trace_core.udf.invoke_payload`` builds it, for the Lite
  launcher (``trace_lite.udf``) too. Lambda's own retries are switched off once per function
  (``PutFunctionEventInvokeConfig MaximumRetryAttempts=0``): the Dispatcher owns retries.
* ``LambdaLauncher.launch(task_id)`` claims the task through the Dispatcher (a normal attempt
  with a lease), builds the payload and invokes. If the invoke fails, nothing is undone: the
  attempt simply never heartbeats, its lease expires, and the reaper retries the task with
  backoff exactly as for a worker that died -- one retry mechanism for every runtime.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from trace_aws._boto import AwsCalls, client
from trace_core import errors, udf, wire
from trace_core.ports import ObjectStore

log = logging.getLogger("trace.lambda")

#: Lambda's asynchronous invocation payload limit.
MAX_EVENT_PAYLOAD = 256 * 1024


class LambdaInvoker:
    """Invokes one function asynchronously with task payloads."""

    def __init__(
        self,
        function_name: str,
        *,
        lambda_client: Any | None = None,
        endpoint_url: str | None = None,
        region_name: str | None = None,
    ) -> None:
        self.function_name = function_name
        # no HTTP-level retries either: a retried Event invoke may run the function twice
        self._lambda = lambda_client or client(
            "lambda", endpoint_url=endpoint_url, region_name=region_name, max_attempts=1
        )
        self._calls = AwsCalls(max_workers=8, name="trace-lambda")
        self._retries_off = False

    async def disable_retries(self) -> None:
        """``MaximumRetryAttempts=0`` on the function. Raises ``Unavailable``, ``NotFound``."""
        await self._calls.run(
            "lambda event invoke config",
            self._lambda.put_function_event_invoke_config,
            FunctionName=self.function_name,
            MaximumRetryAttempts=0,
        )
        self._retries_off = True

    async def invoke(self, payload: wire.LambdaInvokePayload) -> None:
        """Invoke with ``InvocationType=Event``. Raises ``PayloadTooLarge``, ``Unavailable``
        (including any non-202 answer), ``NotFound``, ``Forbidden``."""
        if not self._retries_off:
            await self.disable_retries()
        body = json.dumps(wire.unstructure(payload), separators=(",", ":")).encode()
        if len(body) > MAX_EVENT_PAYLOAD:
            raise errors.PayloadTooLarge("Lambda event payloads are limited to 256 KiB")
        resp = await self._calls.run(
            "lambda invoke",
            self._lambda.invoke,
            FunctionName=self.function_name,
            InvocationType="Event",
            Payload=body,
        )
        if resp.get("StatusCode") != 202 or resp.get("FunctionError"):
            raise errors.Unavailable(f"lambda invoke answered {resp.get('StatusCode')}")

    async def close(self) -> None:
        self._calls.close()


class LambdaLauncher:
    """Claims a task's attempt through the Dispatcher and hands it to Lambda."""

    def __init__(
        self,
        dispatcher: Any,
        invoker: LambdaInvoker,
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

        An invoke failure is logged, not raised: the attempt stays leased and times out, and
        the reaper retries it. Raises ``Unavailable`` only if the claim itself failed.
        """
        try:
            claim: wire.ClaimResponse = await self.dispatcher.claim(
                task_id, f"lambda:{self.invoker.function_name}"
            )
        except (errors.TaskNotClaimable, errors.TaskCanceled, errors.NotFound):
            return None
        try:
            task = await self.dispatcher.fetch(task_id, claim.attempt)
            bundle_url = await self.store.signed_url(
                udf.bundle_key(task), method="GET", expires_in=self.bundle_url_ttl_s
            )
            payload = udf.invoke_payload(task, claim, bundle_url)
            await self.invoker.invoke(payload)
        except errors.TraceError as exc:
            log.warning(
                "lambda invoke failed; the attempt will time out and be retried",
                extra={"task_id": task_id, "attempt": claim.attempt, "error": str(exc)},
            )
        return claim


__all__ = ["MAX_EVENT_PAYLOAD", "LambdaInvoker", "LambdaLauncher"]
