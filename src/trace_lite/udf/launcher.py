"""The Lite invoker of ``runtime: lambda`` tasks: the Lite runner in Lambda's place.

The launcher is the one both profiles use (``trace_lite.invoke_launcher.InvokeLauncher``);
``RunnerInvoker`` only sends the event: an HTTP POST of ``event_body(payload)`` to the
runner's Lambda-style Invoke path with ``X-Amz-Invocation-Type: Event``. An invoke failure is
logged by the launcher, not raised: the attempt stays leased, times out, and the reaper retries
it -- as on AWS.
"""

from __future__ import annotations

import aiohttp

from trace_core import errors, wire
from trace_lite.invoke_launcher import MAX_EVENT_PAYLOAD, InvokeLauncher, event_body


class RunnerInvoker:
    """Sends invoke payloads to a Lite runner (``trace udf runner``); an ``Invoker``."""

    def __init__(self, runner_url: str, function_name: str = "trace-udf") -> None:
        self.runner_url = runner_url.rstrip("/")
        self.function_name = function_name
        self._session: aiohttp.ClientSession | None = None

    @property
    def worker_id(self) -> str:
        """The attempts this invoker starts are leased to ``udf-runner:<function name>``."""
        return f"udf-runner:{self.function_name}"

    async def invoke(self, payload: wire.LambdaInvokePayload) -> None:
        """Raises ``PayloadTooLarge``, ``Unavailable`` (no 202 answer)."""
        body = event_body(payload)
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        url = f"{self.runner_url}/2015-03-31/functions/{self.function_name}/invocations"
        try:
            async with self._session.post(
                url,
                data=body,
                headers={"Content-Type": "application/json", "X-Amz-Invocation-Type": "Event"},
            ) as resp:
                if resp.status != 202:
                    raise errors.Unavailable(f"the UDF runner answered {resp.status}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise errors.Unavailable(f"the UDF runner is unreachable: {exc}") from None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


#: The launcher of the Lite profile: ``InvokeLauncher(dispatcher, RunnerInvoker(...), store)``.
UdfLauncher = InvokeLauncher


__all__ = ["MAX_EVENT_PAYLOAD", "RunnerInvoker", "UdfLauncher"]
