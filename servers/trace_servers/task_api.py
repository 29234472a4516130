"""The task API: what platform components and running attempts call, over ``trace_lite``.

Two surfaces (``docs/architecture/contracts.md``):

* ``/internal/*`` -- platform components only, ``Authorization: Bearer <platform credential>``:
  ``task-claim`` (one task or a batch), ``task-fetch``, ``task-complete-batch`` and the admin
  API (create tasks, cancel, inspect, counts).
* ``/v1/task/*`` -- the holder of an attempt's capability token in ``X-Trace-Task-Capability``:
  ``heartbeat``, ``events``, ``buffer-publish``, ``complete``, ``resolve``, ``credentials``
  (AWS profile: attempt-scoped STS credentials; ``not_found`` without a minter); all fenced on
  ``(task_id, attempt, lease_token)``. The token is verified and checked against its task
  before the body is read; the body's fence must then name the token's task and attempt.

Bodies are read through ``trace_servers.http`` (limits, content type, strict wire records).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import attrs
from aiohttp import web

from trace_core import errors, wire
from trace_core.token import CapabilityClaims
from trace_lite.batching import CompletionBatcher
from trace_servers import logs
from trace_servers.http import (
    DATASETS_KEY,
    DISPATCHER_KEY,
    MAX_BATCH_BODY,
    authenticate_task,
    bind_fence,
    capability_token,
    decode_as,
    ok,
    read_body,
    read_json,
    receive,
    require_platform,
)
from trace_servers.http_errors import public_message

F = TypeVar("F", bound=wire.FenceFields)


class CredentialMinter(Protocol):
    """Mints storage credentials scoped to one attempt (``trace_aws.credentials``)."""

    async def mint(
        self,
        *,
        org_id: str,
        task_id: str,
        attempt: int,
        timeout_s: int,
        payload: dict[str, Any],
        requested: list[str] | None = None,
    ) -> wire.CredentialsResponse: ...


BATCHER_KEY = web.AppKey("completion_batcher", CompletionBatcher)
MINTER_KEY: web.AppKey[CredentialMinter] = web.AppKey("credential_minter")

_ATTEMPT_RE = re.compile(r"[0-9]{1,10}")


# --- /internal -------------------------------------------------------------------------------


async def task_claim(request: web.Request) -> web.Response:
    require_platform(request)
    body = await read_json(request)
    dispatcher = request.app[DISPATCHER_KEY]
    if isinstance(body, dict) and "task_ids" in body:
        batch = wire.structure(body, wire.ClaimBatchRequest)
        return ok(await dispatcher.claim_many(batch.task_ids, batch.worker_id))
    req = wire.structure(body, wire.ClaimRequest)
    logs.bind(task_id=req.task_id)
    return ok(await dispatcher.claim(req.task_id, req.worker_id))


async def task_fetch(request: web.Request) -> web.Response:
    require_platform(request)
    task_id = _valid_task_id(request.query.get("task_id", ""))
    attempt: int | None = None
    if "attempt" in request.query:
        raw = request.query["attempt"]
        if not _ATTEMPT_RE.fullmatch(raw) or not 1 <= int(raw) <= wire.INT32_MAX:
            raise errors.ValidationFailed(
                f"attempt must be an integer between 1 and {wire.INT32_MAX}", field="attempt"
            )
        attempt = int(raw)
    logs.bind(task_id=task_id, attempt=attempt)
    return ok(await request.app[DISPATCHER_KEY].fetch(task_id, attempt))


async def task_complete_batch(request: web.Request) -> web.Response:
    """Completions of several attempts in one call, for platform worker wrappers.

    Needs the platform credential *and*, per item, the attempt's capability token: each item is
    authorised and fenced exactly like ``/v1/task/complete`` and answered on its own; the
    accepted ones share group commits. Transient failures come back per item as
    ``unavailable`` (retry those items).
    """
    require_platform(request)
    batch = await read_body(request, wire.CompleteBatchRequest, MAX_BATCH_BODY)
    dispatcher = request.app[DISPATCHER_KEY]
    batcher = request.app[BATCHER_KEY]

    async def one(item: wire.TokenedCompletion) -> wire.CompleteBatchItem:
        c = item.completion
        try:
            await dispatcher.authorize(item.capability_token, c.task_id, c.attempt)
            done = await batcher.complete(c)
        except errors.TraceError as exc:
            return wire.CompleteBatchItem(
                c.task_id, c.attempt, None, False, exc.code, public_message(exc)
            )
        return wire.CompleteBatchItem(c.task_id, c.attempt, done.state, done.replay, None, None)

    results = await asyncio.gather(*(one(i) for i in batch.completions))
    return ok(wire.CompleteBatchResponse(results=list(results)))


async def create_tasks(request: web.Request) -> web.Response:
    require_platform(request)
    body = await read_json(request, MAX_BATCH_BODY)
    dispatcher = request.app[DISPATCHER_KEY]
    if isinstance(body, dict) and "tasks" in body:
        batch = wire.structure(body, wire.CreateTasksRequest)
        infos = await dispatcher.create_tasks(batch.tasks)
        return ok({"tasks": infos}, status=201)
    single = wire.structure(body, wire.CreateTaskRequest)
    (info,) = await dispatcher.create_tasks([single])
    return ok(info, status=201 if info.created else 200)


def _valid_task_id(task_id: str) -> str:
    wire.structure({"task_id": task_id}, wire.ClaimRequest)  # validates the UUID
    logs.bind(task_id=task_id)
    return task_id


async def cancel_task(request: web.Request) -> web.Response:
    require_platform(request)
    task_id = _valid_task_id(request.match_info["task_id"])
    return ok(await request.app[DISPATCHER_KEY].cancel(task_id))


async def get_task(request: web.Request) -> web.Response:
    require_platform(request)
    task_id = _valid_task_id(request.match_info["task_id"])
    return web.json_response(await request.app[DISPATCHER_KEY].get_task(task_id))


async def task_counts(request: web.Request) -> web.Response:
    require_platform(request)
    return web.json_response(await request.app[DISPATCHER_KEY].counts())


# --- /v1/task --------------------------------------------------------------------------------


def _fenced(
    cls: type[F], call: Callable[[web.Request, F], Awaitable[Any]]
) -> Callable[[web.Request], Awaitable[web.Response]]:
    """A ``/v1/task/*`` handler: verify the token, decode ``cls``, bind its fence, ``call``."""

    async def handler(request: web.Request) -> web.Response:
        _claims, req = await _attempt_request(request, cls)
        return ok(await call(request, req))

    return handler


async def _attempt_request(request: web.Request, cls: type[F]) -> tuple[CapabilityClaims, F]:
    """The verified token claims and the body as ``cls`` of a ``/v1/task/*`` call.

    The bytes are received before the token is verified (the client may hang up once it has
    sent them) but decoded only after. Raises ``Unauthenticated``, ``Forbidden`` (the fence
    names another task or attempt) and ``receive``/``decode`` errors.
    """
    token = capability_token(request)
    raw = await receive(request)
    claims = await authenticate_task(request, token)
    req = decode_as(request, raw, cls)
    bind_fence(claims, req)
    return claims, req


async def _heartbeat(request: web.Request, req: wire.HeartbeatRequest) -> Any:
    return await request.app[DISPATCHER_KEY].heartbeat(req)


async def _events(request: web.Request, req: wire.EventsRequest) -> Any:
    return await request.app[DISPATCHER_KEY].emit_events(req)


async def _buffer_publish(request: web.Request, req: wire.BufferPublishRequest) -> Any:
    return await request.app[DISPATCHER_KEY].publish_buffer(req)


async def _complete(request: web.Request, req: wire.CompleteRequest) -> Any:
    # group commit: concurrent completions share one transaction (trace_lite.batching)
    return await request.app[BATCHER_KEY].complete(req)


async def task_resolve(request: web.Request) -> web.Response:
    """``/v1/task/resolve``: a running attempt resolves the datasets its token grants."""
    claims, req = await _attempt_request(request, wire.TaskResolveRequest)
    await request.app[DISPATCHER_KEY].running_attempt(req)  # only the current, running attempt
    datasets = request.app[DATASETS_KEY]
    res = await datasets.resolve_for_task(claims, req.datasets, pin_ttl_s=req.pin_ttl_s)
    return web.json_response(attrs.asdict(res))


async def task_credentials(request: web.Request) -> web.Response:
    """Attempt-scoped storage credentials: capability token, fenced, AWS profile only."""
    _claims, req = await _attempt_request(request, wire.CredentialsRequest)
    minter = request.app.get(MINTER_KEY)
    if minter is None:
        raise errors.NotFound(
            "this Dispatcher mints no credentials (Lite profile: use the "
            "object routes and signed URLs)"
        )
    org_id, timeout_s, payload = await request.app[DISPATCHER_KEY].running_attempt(req)
    return ok(
        await minter.mint(
            org_id=org_id,
            task_id=req.task_id,
            attempt=req.attempt,
            timeout_s=timeout_s,
            payload=payload,
            requested=req.read_prefixes,
        )
    )


async def _close_batcher(app: web.Application) -> None:
    await app[BATCHER_KEY].close()


def setup(app: web.Application, *, credential_minter: CredentialMinter | None) -> None:
    """Mount the task API on ``app`` (``DISPATCHER_KEY`` and ``DATASETS_KEY`` set)."""
    app[BATCHER_KEY] = CompletionBatcher(app[DISPATCHER_KEY])
    app.on_cleanup.append(_close_batcher)
    if credential_minter is not None:
        app[MINTER_KEY] = credential_minter
    app.add_routes(
        [
            web.post("/internal/task-claim", task_claim),
            web.get("/internal/task-fetch", task_fetch),
            web.post("/internal/task-complete-batch", task_complete_batch),
            web.post("/internal/admin/tasks", create_tasks),
            web.get("/internal/admin/tasks/{task_id}", get_task),
            web.post("/internal/admin/tasks/{task_id}/cancel", cancel_task),
            web.get("/internal/admin/counts", task_counts),
            web.post("/v1/task/heartbeat", _fenced(wire.HeartbeatRequest, _heartbeat)),
            web.post("/v1/task/events", _fenced(wire.EventsRequest, _events)),
            web.post(
                "/v1/task/buffer-publish", _fenced(wire.BufferPublishRequest, _buffer_publish)
            ),
            web.post("/v1/task/complete", _fenced(wire.CompleteRequest, _complete)),
            web.post("/v1/task/resolve", task_resolve),
            web.post("/v1/task/credentials", task_credentials),
        ]
    )


__all__ = ["BATCHER_KEY", "MINTER_KEY", "CredentialMinter", "setup"]
