"""The Lite launcher of ``runtime: lambda`` tasks: claim, build the invoke payload, send it to
the Lite runner -- the AWS launcher's steps (``trace_aws.lambda_invoker.LambdaLauncher``) with
the runner in Lambda's place.

The payload comes from the one builder both use (``trace_core.udf.invoke_payload``); the
invoke is an HTTP POST of that JSON to the runner's Lambda-style Invoke path with
``X-Amz-Invocation-Type: Event``. An invoke failure is logged, not raised: the attempt stays
leased, times out, and the reaper retries it -- as on AWS.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import aiohttp

from trace_core import errors, udf, wire
from trace_core.ports import ObjectStore

log = logging.getLogger("trace.udf")

#: Same limit as Lambda's asynchronous invocations.
MAX_EVENT_PAYLOAD = 256 * 1024


class RunnerInvoker:
    """Sends invoke payloads to a Lite runner (``trace udf runner``)."""

    def __init__(self, runner_url: str, function_name: str = "trace-udf") -> None:
        self.runner_url = runner_url.rstrip("/")
        self.function_name = function_name
        self._session: aiohttp.ClientSession | None = None

    async def invoke(self, payload: wire.LambdaInvokePayload) -> None:
        """Raises ``PayloadTooLarge``, ``Unavailable`` (no 202 answer)."""
        body = json.dumps(wire.unstructure(payload), separators=(",", ":")).encode()
        if len(body) > MAX_EVENT_PAYLOAD:
            raise errors.PayloadTooLarge("invoke payloads are limited to 256 KiB")
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


class UdfLauncher:
    """Claims a task's attempt through the Dispatcher and hands it to the Lite runner."""

    def __init__(
        self,
        dispatcher: Any,
        invoker: RunnerInvoker,
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
        Raises ``Unavailable`` only if the claim itself failed."""
        try:
            claim: wire.ClaimResponse = await self.dispatcher.claim(
                task_id, f"udf-runner:{self.invoker.function_name}"
            )
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
                "udf invoke failed; the attempt will time out and be retried",
                extra={"task_id": task_id, "attempt": claim.attempt, "error": str(exc)},
            )
        return claim


__all__ = ["MAX_EVENT_PAYLOAD", "RunnerInvoker", "UdfLauncher"]
