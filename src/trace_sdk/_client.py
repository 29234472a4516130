"""HTTP client for the Dispatcher: the ``TaskSurface`` port over HTTP, plus the admin calls the
CLI and tests use.

Transient failures (connection refused or reset, timeouts, 503) are retried with capped,
jittered backoff until ``deadline_s`` passes: every call the worker makes is idempotent
(claims are fenced by state, mutations by ``(task_id, attempt, lease_token)`` and keys, and a
repeated completion with the same body is a replay). A definitive answer (any 4xx) is raised as
the ``trace_core.errors`` class its body's ``error`` code names (``errors.class_for_code``);
per-item errors of a batch completion come back as instances of those classes.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from typing import Any, TypeVar

import aiohttp
import cattrs

from trace_core import errors, wire

T = TypeVar("T")

CAPABILITY_HEADER = "X-Trace-Task-Capability"

#: Responses are parsed leniently: a newer Dispatcher may add fields (requests stay strict).
_lenient = cattrs.Converter()


def error_from_body(status: int, body: Any) -> errors.TraceError:
    """The ``trace_core.errors`` instance an error body names (by its ``error`` code); an
    unknown code is ``Unavailable`` for a 5xx status, ``InvalidRequest`` otherwise."""
    code = body.get("error") if isinstance(body, dict) else None
    message = body.get("message") if isinstance(body, dict) else None
    cls = errors.class_for_code(code) if isinstance(code, str) else None
    if cls is None or cls is errors.TraceError:
        cls = errors.Unavailable if status >= 500 else errors.InvalidRequest
    field = body.get("field") if isinstance(body, dict) else None
    return cls(
        message if isinstance(message, str) else f"HTTP {status}",
        field=field if isinstance(field, str) else None,
    )


class DispatcherClient:
    """Calls the Dispatcher's ``/internal`` (platform credential) and ``/v1/task`` routes;
    implements ``trace_core.ports.TaskSurface``."""

    def __init__(
        self,
        base_url: str,
        *,
        platform_token: str | None = None,
        session: aiohttp.ClientSession | None = None,
        deadline_s: float = 120.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.platform_token = platform_token
        self._session = session
        self._owns_session = session is None
        self.deadline_s = deadline_s

    async def __aenter__(self) -> DispatcherClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=30, connect=5),
                connector=aiohttp.TCPConnector(limit=64),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None and self._owns_session:
            await self._session.close()
        self._session = None

    async def request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        params: dict[str, str] | None = None,
        capability: str | None = None,
        platform: bool = False,
        deadline_s: float | None = None,
    ) -> Any:
        """One call, retried on transient failure until the deadline.

        Returns the decoded JSON body. Raises the ``trace_core.errors`` class of a definitive
        error, ``Unavailable`` when the deadline passes.
        """
        headers: dict[str, str] = {}
        if platform and self.platform_token:
            headers["Authorization"] = f"Bearer {self.platform_token}"
        if capability:
            headers[CAPABILITY_HEADER] = capability
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.deadline_s if deadline_s is None else deadline_s)
        tries = 0
        while True:
            try:
                async with self.session.request(
                    method, self.base_url + path, json=json_body, params=params, headers=headers
                ) as resp:
                    body = await resp.json(content_type=None)
                    if resp.status < 400:
                        return body
                    exc = error_from_body(resp.status, body)
                    if not isinstance(exc, errors.Retryable):
                        raise exc
                    last: Exception = exc
            except (aiohttp.ClientError, TimeoutError, ValueError) as e:
                last = e
            tries += 1
            if loop.time() >= deadline:
                raise errors.Unavailable(f"dispatcher unreachable: {last}") from last
            await asyncio.sleep(min(2.0, 0.05 * 2 ** min(tries, 6)) * (0.5 + random.random()))

    # -- the TaskSurface port: /internal (platform credential) ------------------------------

    async def claim_many(self, task_ids: Sequence[str], worker_id: str) -> wire.ClaimBatchResponse:
        body = await self.request(
            "POST",
            "/internal/task-claim",
            platform=True,
            json_body={"task_ids": list(task_ids), "worker_id": worker_id},
        )
        return _lenient.structure(body, wire.ClaimBatchResponse)

    async def fetch(self, task_id: str, attempt: int | None = None) -> wire.TaskPayload:
        params = {"task_id": task_id}
        if attempt is not None:
            params["attempt"] = str(attempt)
        body = await self.request("GET", "/internal/task-fetch", platform=True, params=params)
        return _lenient.structure(body, wire.TaskPayload)

    async def complete_batch(
        self, items: Sequence[wire.TokenedCompletion]
    ) -> list[wire.CompleteResponse | errors.TraceError]:
        body = await self.request(
            "POST",
            "/internal/task-complete-batch",
            platform=True,
            json_body={"completions": wire.unstructure(list(items))},
        )
        answer = _lenient.structure(body, wire.CompleteBatchResponse)
        results: list[wire.CompleteResponse | errors.TraceError] = []
        for res in answer.results:
            if res.error is None and res.state is not None:
                results.append(
                    wire.CompleteResponse(res.task_id, res.attempt, res.state, res.replay)
                )
            else:
                results.append(error_from_body(409, {"error": res.error, "message": res.message}))
        return results

    # -- the TaskSurface port: /v1/task (the attempt's capability token) --------------------

    async def heartbeat(
        self, capability_token: str, req: wire.HeartbeatRequest
    ) -> wire.HeartbeatResponse:
        body = await self.request(
            "POST",
            "/v1/task/heartbeat",
            capability=capability_token,
            json_body=wire.unstructure(req),
            deadline_s=10.0,
        )
        return _lenient.structure(body, wire.HeartbeatResponse)

    async def events(self, capability_token: str, req: wire.EventsRequest) -> wire.EventsResponse:
        body = await self.request(
            "POST", "/v1/task/events", capability=capability_token, json_body=wire.unstructure(req)
        )
        return _lenient.structure(body, wire.EventsResponse)

    async def buffer_publish(
        self, capability_token: str, req: wire.BufferPublishRequest
    ) -> wire.BufferPublishResponse:
        body = await self.request(
            "POST",
            "/v1/task/buffer-publish",
            capability=capability_token,
            json_body=wire.unstructure(req),
        )
        return _lenient.structure(body, wire.BufferPublishResponse)

    async def complete(
        self, capability_token: str, req: wire.CompleteRequest
    ) -> wire.CompleteResponse:
        body = await self.request(
            "POST",
            "/v1/task/complete",
            capability=capability_token,
            json_body=wire.unstructure(req),
        )
        return _lenient.structure(body, wire.CompleteResponse)

    # -- admin (platform credential) --------------------------------------------------------

    async def claim(self, task_id: str, worker_id: str) -> wire.ClaimResponse:
        """Claim one task (``/internal/task-claim`` with ``task_id``). Raises the refusal."""
        body = await self.request(
            "POST",
            "/internal/task-claim",
            platform=True,
            json_body={"task_id": task_id, "worker_id": worker_id},
        )
        return _lenient.structure(body, wire.ClaimResponse)

    async def create_tasks(self, tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
        body = await self.request(
            "POST", "/internal/admin/tasks", platform=True, json_body={"tasks": tasks}
        )
        result: list[dict[str, Any]] = body["tasks"]
        return result

    async def cancel(self, task_id: str) -> dict[str, Any]:
        result: dict[str, Any] = await self.request(
            "POST", f"/internal/admin/tasks/{task_id}/cancel", platform=True
        )
        return result

    async def get_task(self, task_id: str) -> dict[str, Any]:
        result: dict[str, Any] = await self.request(
            "GET", f"/internal/admin/tasks/{task_id}", platform=True
        )
        return result

    async def counts(self) -> dict[str, int]:
        result: dict[str, int] = await self.request("GET", "/internal/admin/counts", platform=True)
        return result


__all__ = ["CAPABILITY_HEADER", "DispatcherClient", "error_from_body"]
