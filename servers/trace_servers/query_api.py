"""The Query Service over HTTP: SQL over published datasets, interactive mode.

    POST /v1/query        user JWT bearer; body {org, sql, format?, max_rows?}
    POST /v1/task/query   capability token (X-Trace-Task-Capability); body {task_id, attempt,
                          lease_token, sql, format?, max_rows?}: fenced like /v1/task/resolve
                          (the token's own task and attempt, the running attempt's lease);
                          only the datasets the token grants, in the task's org

A thin adapter over ``trace_lite.query.QueryService``: the credential is verified before the
body is read (``trace_servers.http``), then the service parses, gates, pins, runs the SQL in a
sandbox process and releases the pins. ``format`` is ``json`` (default: columns with their
DuckDB types, rows as arrays, ``truncated``, the pinned ``versions``) or ``csv`` (a header row;
``X-Trace-Truncated`` and ``X-Trace-Versions`` headers). ``max_rows`` is capped by the
service's row limit. Errors map in ``trace_servers.http_errors``: 422 ``validation_failed``
(field ``sql``: syntax error with its position, a refused construct, a failed query, a limit
exceeded), 404 ``not_found`` ("dataset not found or not readable", naming none), 413 (result
over the byte limit), 503 when the Query Service is not available in this profile.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from typing import Any

import attrs
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram

from trace_core import errors, wire
from trace_core.wire import FieldError
from trace_lite.local_store import LocalObjectStore
from trace_lite.query import QueryOutcome, QueryResult, QueryService, SandboxPool
from trace_servers import user_api
from trace_servers.http import (
    DATASETS_KEY,
    DISPATCHER_KEY,
    authenticate_task,
    bind_fence,
    capability_token,
    decode_as,
    receive,
)

#: The Query Service; None where it cannot run (it reads the Lite object store's files).
QUERY_KEY: web.AppKey[QueryService | None] = web.AppKey("query_service")

MAX_SQL_CHARS = 100_000
FORMATS = ("json", "csv")


def _sql(_instance: Any, attribute: attrs.Attribute[str], value: str) -> None:
    if not value.strip() or len(value) > MAX_SQL_CHARS:
        raise FieldError(attribute.name, f"{attribute.name}: 1 to {MAX_SQL_CHARS} characters")


def _format(_instance: Any, attribute: attrs.Attribute[str], value: str) -> None:
    if value not in FORMATS:
        raise FieldError(attribute.name, f"{attribute.name}: one of {', '.join(FORMATS)}")


def _max_rows(_instance: Any, attribute: attrs.Attribute[int | None], value: int | None) -> None:
    if value is not None and not 0 <= value <= 1_000_000:
        raise FieldError(attribute.name, f"{attribute.name}: 0 to 1000000")


@attrs.frozen
class TaskQueryRequest(wire.FenceFields):
    """A running attempt's query, fenced like ``/v1/task/resolve``: the body names the token's
    task and attempt and the attempt's lease token, checked against the task row first."""

    sql: str = attrs.field(validator=[attrs.validators.instance_of(str), _sql])
    format: str = attrs.field(default="json", validator=_format)
    max_rows: int | None = attrs.field(default=None, validator=_max_rows)


@attrs.frozen
class QueryRequest:
    org: str = attrs.field(validator=attrs.validators.instance_of(str))
    sql: str = attrs.field(validator=[attrs.validators.instance_of(str), _sql])
    format: str = attrs.field(default="json", validator=_format)
    max_rows: int | None = attrs.field(default=None, validator=_max_rows)


def _service(request: web.Request) -> QueryService:
    service = request.app[QUERY_KEY]
    if service is None:
        raise errors.Unavailable("the Query Service is not available in this profile")
    return service


def _answer(result: QueryResult, fmt: str) -> web.Response:
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(result.columns)
        for row in result.rows:
            writer.writerow([json.dumps(v) if isinstance(v, list | dict) else v for v in row])
        return web.Response(
            text=out.getvalue(),
            content_type="text/csv",
            headers={
                "X-Trace-Truncated": "true" if result.truncated else "false",
                "X-Trace-Versions": json.dumps(result.versions, sort_keys=True),
            },
        )
    return web.json_response(
        {
            "columns": [
                {"name": n, "type": t} for n, t in zip(result.columns, result.types, strict=True)
            ],
            "rows": result.rows,
            "truncated": result.truncated,
            "versions": result.versions,
        }
    )


async def query(request: web.Request) -> web.Response:
    """``POST /v1/query``: a user's SQL in one of their orgs."""
    identity = user_api.authenticate_user(request)
    raw = await receive(request)
    body = decode_as(request, raw, QueryRequest)
    service = _service(request)
    caller = await request.app[DATASETS_KEY].user_caller(body.org, identity.subject)
    result = await service.query(caller, body.org, body.sql, max_rows=body.max_rows)
    return _answer(result, body.format)


async def task_query(request: web.Request) -> web.Response:
    """``POST /v1/task/query``: a running task's SQL over the datasets its token grants."""
    token = capability_token(request)
    raw = await receive(request)
    claims = await authenticate_task(request, token)
    body = decode_as(request, raw, TaskQueryRequest)
    bind_fence(claims, body)  # 403: the fence names another task or attempt
    # 409 unless this is the task's current, running attempt with this lease: nothing is read
    await request.app[DISPATCHER_KEY].running_attempt(body)
    result = await _service(request).query_for_task(claims, body.sql, max_rows=body.max_rows)
    return _answer(result, body.format)


def _observer(registry: CollectorRegistry) -> Callable[[QueryOutcome], None]:
    """Per-query metrics on ``registry`` (``/metrics``): queries by outcome, latency, rows and
    bytes answered."""
    queries = Counter("trace_queries", "Queries by outcome", ["outcome"], registry=registry)
    latency = Histogram(
        "trace_query_seconds",
        "Query latency (parse, resolve, pin, sandbox)",
        registry=registry,
        buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    )
    rows = Counter("trace_query_rows", "Rows answered by queries", registry=registry)
    size = Counter("trace_query_bytes", "Bytes of query answers", registry=registry)

    def observe(outcome: QueryOutcome) -> None:
        queries.labels(outcome.outcome).inc()
        latency.observe(outcome.seconds)
        rows.inc(outcome.rows)
        size.inc(outcome.bytes)

    return observe


def setup(
    app: web.Application,
    *,
    data_url: str | None = None,
    registry: CollectorRegistry | None = None,
) -> None:
    """Mount the query routes on ``app`` (``DISPATCHER_KEY`` and ``DATASETS_KEY`` set, the user
    API set up). The service runs where the object store is the Lite local one, with a pool of
    two pre-started sandboxes (each used for one query), filled from the first query on (an
    app that never queries starts none); ``data_url`` (the data database)
    enables Postgres-table datasets; ``registry`` gets the per-query metrics."""
    store = app[DISPATCHER_KEY].object_store
    datasets = app[DATASETS_KEY]
    service = None
    if isinstance(store, LocalObjectStore):
        pool = SandboxPool(2)
        observe = _observer(registry) if registry is not None else None
        service = QueryService(datasets, store, data_url=data_url, pool=pool, observe=observe)

        async def close_pool(_app: web.Application) -> None:
            await pool.close()

        app.on_cleanup.append(close_pool)
    app[QUERY_KEY] = service
    app.add_routes([web.post("/v1/query", query), web.post("/v1/task/query", task_query)])


__all__ = ["QUERY_KEY", "QueryRequest", "TaskQueryRequest", "setup"]
