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

import asyncio
import csv
import io
import json
import logging
from collections.abc import Callable
from typing import Any

import attrs
import pyarrow as pa
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram

from trace_core import errors, wire
from trace_core.access import Caller
from trace_core.wire import FieldError
from trace_lite.local_store import LocalObjectStore
from trace_lite.query import (
    ARROW_EOS,
    QueryOutcome,
    QueryResult,
    QueryService,
    QueryStream,
    SandboxPool,
    jsonable,
)
from trace_lite.query.exports import ExportStatus, QueryExports
from trace_lite.query.runner import DEFAULT_POOL_SIZE
from trace_lite.query.s3 import S3Access
from trace_sdk.aio import run_every
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
from trace_servers.http_errors import public_message

log = logging.getLogger("trace.query")

#: The Query Service; None where it cannot run (it reads the Lite object store's files).
QUERY_KEY: web.AppKey[QueryService | None] = web.AppKey("query_service")
#: Batch exports of the Query Service (where it runs).
EXPORTS_KEY: web.AppKey[QueryExports | None] = web.AppKey("query_exports")

MAX_SQL_CHARS = 100_000
FORMATS = ("json", "csv")
EXPORT_FORMATS = ("parquet", "csv")


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


def _export_format(_instance: Any, attribute: attrs.Attribute[str], value: str) -> None:
    if value not in EXPORT_FORMATS:
        raise FieldError(attribute.name, f"{attribute.name}: one of {', '.join(EXPORT_FORMATS)}")


def _export_rows(_instance: Any, attribute: attrs.Attribute[int | None], value: int | None) -> None:
    if value is not None and not 0 <= value <= 10_000_000:
        raise FieldError(attribute.name, f"{attribute.name}: 0 to 10000000")


@attrs.frozen
class ExportRequest:
    """A batch export: the whole result (up to the export row cap) as Parquet or CSV."""

    org: str = attrs.field(validator=attrs.validators.instance_of(str))
    sql: str = attrs.field(validator=[attrs.validators.instance_of(str), _sql])
    format: str = attrs.field(default="parquet", validator=_export_format)
    max_rows: int | None = attrs.field(default=None, validator=_export_rows)


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


ARROW_STREAM = "application/vnd.apache.arrow.stream"
NDJSON = "application/x-ndjson"


def _streamed(request: web.Request) -> str | None:
    """The streamed media type the client asks for in ``Accept`` (Arrow IPC stream or
    NDJSON), or None for the ``format`` answer."""
    accept = request.headers.get("Accept", "")
    for media in (ARROW_STREAM, NDJSON):
        if media in accept:
            return media
    return None


async def _stream(
    request: web.Request,
    service: QueryService,
    caller: Caller,
    org: str,
    sql: str,
    max_rows: int | None,
    media: str,
) -> web.StreamResponse:
    """Answer an Arrow IPC stream or NDJSON as the sandbox produces it (at most the stream row
    limit). Errors before the first byte are ordinary error answers; a failure midway ends an
    NDJSON answer with an ``{"error", "message"}`` line and aborts an Arrow answer (no
    end-of-stream marker: the client sees an incomplete stream)."""
    async with service.open_stream(caller, org, sql, max_rows=max_rows) as stream:
        limit = service.stream_limits.max_rows if max_rows is None else max_rows
        response = web.StreamResponse(
            headers={
                "Content-Type": media,
                "X-Trace-Versions": json.dumps(stream.versions, sort_keys=True),
                "X-Trace-Row-Limit": str(min(limit, service.stream_limits.max_rows)),
            }
        )
        response.enable_chunked_encoding()
        await response.prepare(request)
        if media == ARROW_STREAM:
            await _write_arrow(request, response, stream)
        else:
            await _write_ndjson(response, stream)
        return response


async def _write_arrow(
    request: web.Request, response: web.StreamResponse, stream: QueryStream
) -> None:
    await response.write(stream.schema)
    try:
        async for batch in stream.batches():
            await response.write(batch)
    except errors.TraceError as exc:
        log.warning("query stream stopped midway", extra={"error": exc.code})
        if request.transport is not None:
            request.transport.close()
        return
    await response.write(ARROW_EOS)
    await response.write_eof()


async def _write_ndjson(response: web.StreamResponse, stream: QueryStream) -> None:
    def line(value: object) -> bytes:
        return json.dumps(value, separators=(",", ":"), allow_nan=False).encode() + b"\n"

    columns = [{"name": n, "type": t} for n, t in zip(stream.columns, stream.types, strict=True)]
    await response.write(line({"columns": columns, "versions": stream.versions}))
    schema = pa.ipc.read_schema(pa.py_buffer(stream.schema))
    try:
        async for message in stream.batches():
            batch = pa.ipc.read_record_batch(pa.py_buffer(message), schema)
            values = [c.to_pylist() for c in batch.columns]
            await response.write(
                b"".join(line([jsonable(v) for v in row]) for row in zip(*values, strict=True))
            )
    except errors.TraceError as exc:
        await response.write(line({"error": exc.code, "message": public_message(exc)}))
    else:
        await response.write(line({"rows": stream.rows, "truncated": stream.truncated}))
    await response.write_eof()


async def query(request: web.Request) -> web.StreamResponse:
    """``POST /v1/query``: a user's SQL in one of their orgs."""
    identity = user_api.authenticate_user(request)
    raw = await receive(request)
    body = decode_as(request, raw, QueryRequest)
    service = _service(request)
    caller = await request.app[DATASETS_KEY].user_caller(body.org, identity.subject)
    media = _streamed(request)
    if media is not None:
        return await _stream(request, service, caller, body.org, body.sql, body.max_rows, media)
    result = await service.query(caller, body.org, body.sql, max_rows=body.max_rows)
    return _answer(result, body.format)


async def task_query(request: web.Request) -> web.StreamResponse:
    """``POST /v1/task/query``: a running task's SQL over the datasets its token grants."""
    token = capability_token(request)
    raw = await receive(request)
    claims = await authenticate_task(request, token)
    body = decode_as(request, raw, TaskQueryRequest)
    bind_fence(claims, body)  # 403: the fence names another task or attempt
    # 409 unless this is the task's current, running attempt with this lease: nothing is read
    await request.app[DISPATCHER_KEY].running_attempt(body)
    service = _service(request)
    media = _streamed(request)
    if media is not None:
        caller, org = await service.task_scope(claims)
        return await _stream(request, service, caller, org, body.sql, body.max_rows, media)
    result = await service.query_for_task(claims, body.sql, max_rows=body.max_rows)
    return _answer(result, body.format)


def _exports(request: web.Request) -> QueryExports:
    exports = request.app[EXPORTS_KEY]
    if exports is None:
        raise errors.Unavailable("the Query Service is not available in this profile")
    return exports


def _status(status: ExportStatus, http_status: int = 200) -> web.Response:
    return web.json_response(attrs.asdict(status), status=http_status)


async def export_start(request: web.Request) -> web.Response:
    """``POST /v1/query/exports``: start a batch export (202 with its running status)."""
    identity = user_api.authenticate_user(request)
    raw = await receive(request)
    body = decode_as(request, raw, ExportRequest)
    exports = _exports(request)
    caller = await request.app[DATASETS_KEY].user_caller(body.org, identity.subject)
    status = await exports.start(
        caller, body.org, body.sql, fmt=body.format, max_rows=body.max_rows
    )
    return _status(status, 202)


async def export_status(request: web.Request) -> web.Response:
    """``GET /v1/query/exports/{export_id}``: the requester's export, a signed URL once done."""
    identity = user_api.authenticate_user(request)
    export_id = request.match_info["export_id"]
    return _status(await _exports(request).status(identity.subject, export_id))


async def export_cancel(request: web.Request) -> web.Response:
    """``DELETE /v1/query/exports/{export_id}``: cancel a running export (its sandbox is
    killed, nothing is stored); 409 once it has ended."""
    identity = user_api.authenticate_user(request)
    export_id = request.match_info["export_id"]
    return _status(await _exports(request).cancel(identity.subject, export_id))


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


def _s3_access(store: object) -> S3Access | None:
    """The S3 access of the AWS profile's object store (None for any other store)."""
    try:
        from trace_aws.s3_store import S3ObjectStore  # the aws extra
    except ImportError:
        return None
    return S3Access.of_store(store) if isinstance(store, S3ObjectStore) else None


def setup(
    app: web.Application,
    *,
    data_url: str | None = None,
    registry: CollectorRegistry | None = None,
    pool_size: int = DEFAULT_POOL_SIZE,
) -> None:
    """Mount the query routes on ``app`` (``DISPATCHER_KEY`` and ``DATASETS_KEY`` set, the user
    API set up). The service runs where the object store is the Lite local one or S3 (the AWS
    profile: the sandbox reads the pinned objects with DuckDB's httpfs), with a pool of
    ``pool_size`` pre-started sandboxes (each used for one query), filled from the first query on (an
    app that never queries starts none); ``data_url`` (the data database)
    enables Postgres-table datasets; ``registry`` gets the per-query metrics."""
    store = app[DISPATCHER_KEY].object_store
    datasets = app[DATASETS_KEY]
    service = exports = None
    s3 = _s3_access(store)
    if store is not None and (isinstance(store, LocalObjectStore) or s3 is not None):
        pool = SandboxPool(pool_size)
        observe = _observer(registry) if registry is not None else None
        local = store if isinstance(store, LocalObjectStore) else None
        service = QueryService(
            datasets, local, data_url=data_url, pool=pool, observe=observe, s3=s3
        )
        exports = QueryExports(service, datasets, store)
        stop = asyncio.Event()
        purging: list[asyncio.Task[None]] = []

        async def start_purge(_app: web.Application) -> None:
            purge = run_every(stop, 3600, exports.purge_expired, name="query export retention")
            purging.append(asyncio.create_task(purge))

        async def close(_app: web.Application) -> None:
            stop.set()
            await asyncio.gather(*purging)
            await exports.close()
            await pool.close()

        app.on_startup.append(start_purge)
        app.on_cleanup.append(close)
    app[QUERY_KEY] = service
    app[EXPORTS_KEY] = exports
    app.add_routes(
        [
            web.post("/v1/query", query),
            web.post("/v1/task/query", task_query),
            web.post("/v1/query/exports", export_start),
            web.get("/v1/query/exports/{export_id}", export_status),
            web.delete("/v1/query/exports/{export_id}", export_cancel),
        ]
    )


__all__ = [
    "EXPORTS_KEY",
    "QUERY_KEY",
    "ExportRequest",
    "QueryRequest",
    "TaskQueryRequest",
    "setup",
]
