"""The Dispatcher's HTTP surface: a thin aiohttp adapter over ``trace_lite.dispatcher``.

Three surfaces (``docs/architecture/contracts.md``):

* ``/internal/*`` -- platform components only, ``Authorization: Bearer <platform credential>``:
  ``task-claim``, ``task-fetch`` and the admin API (create tasks, cancel, inspect).
* ``/v1/task/*`` -- the holder of an attempt's capability token in ``X-Trace-Task-Capability``:
  ``heartbeat``, ``events``, ``buffer-publish``, ``complete``, ``credentials`` (AWS profile:
  attempt-scoped STS credentials; ``not_found`` without a minter); all fenced on
  ``(task_id, attempt, lease_token)``.
* ``/healthz``, ``/readyz``, ``/metrics`` -- unauthenticated operations endpoints.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from trace_core import errors, wire
from trace_lite.batching import CompletionBatcher
from trace_lite.dispatcher import Dispatcher
from trace_servers import logs
from trace_servers.http_errors import error_middleware, status_for

T = TypeVar("T")

#: API body limit (BRIEF §4).
MAX_BODY = 1024 * 1024
#: Batch task creation mirrors Lambda's synchronous payload limit.
MAX_BATCH_BODY = 6 * 1000 * 1000

CAPABILITY_HEADER = "X-Trace-Task-Capability"

DISPATCHER_KEY = web.AppKey("dispatcher", Dispatcher)
PLATFORM_TOKEN_KEY = web.AppKey("platform_token", str)
METRICS_KEY = web.AppKey("metrics", dict)
BATCHER_KEY = web.AppKey("completion_batcher", CompletionBatcher)


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


MINTER_KEY = web.AppKey("credential_minter", object)


def _metrics() -> dict[str, Any]:
    registry = CollectorRegistry()
    return {
        "registry": registry,
        "requests": Counter(
            "trace_http_requests", "HTTP requests", ["route", "status"], registry=registry
        ),
        "latency": Histogram(
            "trace_http_request_seconds",
            "HTTP request latency",
            ["route"],
            registry=registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
        ),
        "tasks": Gauge("trace_tasks", "Tasks by state", ["state"], registry=registry),
        "outbox": Gauge("trace_outbox_rows", "Outbox rows by state", ["state"], registry=registry),
    }


async def read_json(request: web.Request, limit: int = MAX_BODY) -> Any:
    """The decoded JSON body. Raises ``PayloadTooLarge``, ``MalformedBody``."""
    if request.content_length is not None and request.content_length > limit:
        raise errors.PayloadTooLarge(f"request body exceeds {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > limit:
            raise errors.PayloadTooLarge(f"request body exceeds {limit} bytes")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw:
        raise errors.MalformedBody("a JSON body is required", field="$")
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise errors.MalformedBody(f"body is not valid JSON: {exc}", field="$") from None


async def read_body(request: web.Request, cls: type[T], limit: int = MAX_BODY) -> T:
    return wire.structure(await read_json(request, limit), cls)


def ok(obj: Any, status: int = 200) -> web.Response:
    return web.json_response(wire.unstructure(obj), status=status)


# --- auth ------------------------------------------------------------------------------------


def require_platform(request: web.Request) -> None:
    """Only platform components may call ``/internal/*``.

    Raises ``Unauthenticated`` without a valid platform credential (a capability token in
    either header is never one).
    """
    expected = request.app[PLATFORM_TOKEN_KEY]
    header = request.headers.get("Authorization", "")
    scheme, _, presented = header.partition(" ")
    if scheme.lower() != "bearer" or not presented:
        if CAPABILITY_HEADER in request.headers:
            raise errors.Forbidden("capability tokens cannot call /internal routes")
        raise errors.Unauthenticated("platform credential required")
    if not hmac.compare_digest(presented.encode(), expected.encode()):
        raise errors.Unauthenticated("invalid platform credential")


async def authorize_task(request: web.Request, fence: wire.FenceFields) -> None:
    dispatcher = request.app[DISPATCHER_KEY]
    logs.bind(task_id=fence.task_id, attempt=fence.attempt)
    await dispatcher.authorize(request.headers.get(CAPABILITY_HEADER), fence.task_id, fence.attempt)


# --- /internal -------------------------------------------------------------------------------


async def task_claim(request: web.Request) -> web.Response:
    require_platform(request)
    body = await read_json(request)
    if isinstance(body, dict) and "task_ids" in body:
        batch = wire.structure(body, wire.ClaimBatchRequest)
        return ok(await request.app[DISPATCHER_KEY].claim_many(batch.task_ids, batch.worker_id))
    req = wire.structure(body, wire.ClaimRequest)
    logs.bind(task_id=req.task_id)
    return ok(await request.app[DISPATCHER_KEY].claim(req.task_id, req.worker_id))


async def task_fetch(request: web.Request) -> web.Response:
    require_platform(request)
    task_id = request.query.get("task_id", "")
    wire.structure({"task_id": task_id}, wire.ClaimRequest)  # validates the UUID
    attempt: int | None = None
    if "attempt" in request.query:
        raw = request.query["attempt"]
        if not raw.isdigit() or int(raw) < 1:
            raise errors.ValidationFailed("attempt must be a positive integer", field="attempt")
        attempt = int(raw)
    logs.bind(task_id=task_id, attempt=attempt)
    return ok(await request.app[DISPATCHER_KEY].fetch(task_id, attempt))


async def create_tasks(request: web.Request) -> web.Response:
    require_platform(request)
    body = await read_json(request, MAX_BATCH_BODY)
    if isinstance(body, dict) and "tasks" in body:
        batch = wire.structure(body, wire.CreateTasksRequest)
        infos = await request.app[DISPATCHER_KEY].create_tasks(batch.tasks)
        return ok({"tasks": infos}, status=201)
    single = wire.structure(body, wire.CreateTaskRequest)
    (info,) = await request.app[DISPATCHER_KEY].create_tasks([single])
    return ok(info, status=201 if info.created else 200)


def _task_id(request: web.Request) -> str:
    task_id = request.match_info["task_id"]
    wire.structure({"task_id": task_id}, wire.ClaimRequest)
    logs.bind(task_id=task_id)
    return task_id


async def cancel_task(request: web.Request) -> web.Response:
    require_platform(request)
    return ok(await request.app[DISPATCHER_KEY].cancel(_task_id(request)))


async def get_task(request: web.Request) -> web.Response:
    require_platform(request)
    return web.json_response(await request.app[DISPATCHER_KEY].get_task(_task_id(request)))


async def task_counts(request: web.Request) -> web.Response:
    require_platform(request)
    return web.json_response(await request.app[DISPATCHER_KEY].counts())


# --- /v1/task --------------------------------------------------------------------------------


def _task_route(
    cls: type[Any], call: Callable[[web.Request, Any], Awaitable[Any]]
) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        # Authenticate before parsing in full: an anonymous caller learns nothing about shapes.
        if not request.headers.get(CAPABILITY_HEADER):
            raise errors.Unauthenticated("missing X-Trace-Task-Capability")
        req = await read_body(request, cls)
        await authorize_task(request, req)
        return ok(await call(request, req))

    return handler


async def task_credentials(request: web.Request) -> web.Response:
    """Attempt-scoped storage credentials: capability token, fenced, AWS profile only."""
    if not request.headers.get(CAPABILITY_HEADER):
        raise errors.Unauthenticated("missing X-Trace-Task-Capability")
    req = await read_body(request, wire.CredentialsRequest)
    await authorize_task(request, req)
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
            task_id=req.task_id,  # type: ignore[attr-defined]
            attempt=req.attempt,
            timeout_s=timeout_s,
            payload=payload,
            requested=req.read_prefixes,
        )
    )


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
            return wire.CompleteBatchItem(c.task_id, c.attempt, None, False, exc.code, exc.message)
        return wire.CompleteBatchItem(c.task_id, c.attempt, done.state, done.replay, None, None)

    results = await asyncio.gather(*(one(i) for i in batch.completions))
    return ok(wire.CompleteBatchResponse(results=list(results)))


async def _complete(request: web.Request, req: wire.CompleteRequest) -> wire.CompleteResponse:
    # group commit: concurrent completions share one transaction (trace_lite.batching)
    return await request.app[BATCHER_KEY].complete(req)


async def _close_batcher(app: web.Application) -> None:
    await app[BATCHER_KEY].close()


# --- operations ------------------------------------------------------------------------------


async def healthz(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    try:
        await request.app[DISPATCHER_KEY].counts()
    except errors.TraceError as exc:
        return web.json_response({"status": "unavailable", "error": exc.code}, status=503)
    return web.json_response({"status": "ready"})


async def metrics(request: web.Request) -> web.Response:
    m = request.app[METRICS_KEY]
    dispatcher = request.app[DISPATCHER_KEY]
    try:
        for state, n in (await dispatcher.counts()).items():
            m["tasks"].labels(state).set(n)
        for state, n in (await dispatcher.outbox_counts()).items():
            m["outbox"].labels(state).set(n)
    except errors.TraceError:
        pass  # still serve the request metrics
    return web.Response(
        body=generate_latest(m["registry"]), headers={"Content-Type": "text/plain; version=0.0.4"}
    )


@web.middleware
async def observe_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    logs.clear()
    started = time.perf_counter()
    route = (
        request.match_info.route.resource.canonical if request.match_info.route.resource else "?"
    )
    response = await handler(request)
    m = request.app[METRICS_KEY]
    m["requests"].labels(route, str(response.status)).inc()
    m["latency"].labels(route).observe(time.perf_counter() - started)
    return response


def make_app(
    dispatcher: Dispatcher,
    *,
    platform_token: str,
    extra_routes: list[web.RouteDef] | None = None,
    credential_minter: CredentialMinter | None = None,
    user_auth: Any | None = None,
) -> web.Application:
    """The Dispatcher's aiohttp application (no background work: see ``run``).

    ``user_auth`` (a ``trace_lite.users.UserAuthenticator``) enables the user API
    ``/v1/orgs/...`` (``trace_servers.datasets_api``); without it those routes answer 401."""
    if len(platform_token) < 16:
        raise errors.ValidationFailed("the platform credential must be at least 16 characters")
    app = web.Application(
        middlewares=[observe_middleware, error_middleware], client_max_size=MAX_BATCH_BODY
    )
    app[DISPATCHER_KEY] = dispatcher
    app[PLATFORM_TOKEN_KEY] = platform_token
    app[METRICS_KEY] = _metrics()
    app[BATCHER_KEY] = CompletionBatcher(dispatcher)
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
            web.post(
                "/v1/task/heartbeat",
                _task_route(wire.HeartbeatRequest, lambda q, r: q.app[DISPATCHER_KEY].heartbeat(r)),
            ),
            web.post(
                "/v1/task/events",
                _task_route(wire.EventsRequest, lambda q, r: q.app[DISPATCHER_KEY].emit_events(r)),
            ),
            web.post(
                "/v1/task/buffer-publish",
                _task_route(
                    wire.BufferPublishRequest, lambda q, r: q.app[DISPATCHER_KEY].publish_buffer(r)
                ),
            ),
            web.post("/v1/task/complete", _task_route(wire.CompleteRequest, _complete)),
            web.post("/v1/task/credentials", task_credentials),
            web.get("/healthz", healthz),
            web.get("/readyz", readyz),
            web.get("/metrics", metrics),
        ]
    )
    from trace_servers import datasets_api

    datasets_api.setup(app, dispatcher, user_auth)
    if extra_routes:
        app.add_routes(extra_routes)
    return app


__all__ = ["CAPABILITY_HEADER", "MAX_BODY", "make_app", "read_json", "status_for"]
