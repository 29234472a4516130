"""``runtime: lambda`` tasks: the Dispatcher claims the attempt and invokes the function.

Theory of operation
-------------------

* ``LambdaInvoker`` sends one ``wire.LambdaInvokePayload`` (the ``/internal/task-fetch`` payload
  plus the attempt's capability token, lease token, lease expiry and a presigned bundle URL)
  with ``InvocationType=Event``. Lambda's own retries are switched off once per function
  (``PutFunctionEventInvokeConfig MaximumRetryAttempts=0``): the Dispatcher owns retries.
* The launcher is the one both profiles use (``trace_lite.invoke_launcher.InvokeLauncher``,
  named ``LambdaLauncher`` here): it claims the task through the Dispatcher (a normal attempt
  with a lease), builds the payload with ``trace_core.udf.invoke_payload`` and invokes. If the
  invoke fails, nothing is undone: the attempt simply never heartbeats, its lease expires, and
  the reaper retries the task with backoff exactly as for a worker that died -- one retry
  mechanism for every runtime.
"""

from __future__ import annotations

from typing import Any

from trace_aws._boto import AwsCalls, client
from trace_core import errors, wire
from trace_lite.invoke_launcher import MAX_EVENT_PAYLOAD, InvokeLauncher, event_body


class LambdaInvoker:
    """Invokes one function asynchronously with task payloads; an ``Invoker``."""

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

    @property
    def worker_id(self) -> str:
        """The attempts this invoker starts are leased to ``lambda:<function name>``."""
        return f"lambda:{self.function_name}"

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
        body = event_body(payload)
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


#: The launcher of the AWS profile: ``InvokeLauncher(dispatcher, LambdaInvoker(...), store)``.
LambdaLauncher = InvokeLauncher


__all__ = ["MAX_EVENT_PAYLOAD", "LambdaInvoker", "LambdaLauncher"]
