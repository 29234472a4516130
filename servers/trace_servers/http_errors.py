"""Domain errors → HTTP, in one table, and the JSON error body every route returns."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from trace_core import errors

log = logging.getLogger("trace.http")

#: Most specific class first; the first ``isinstance`` match wins.
STATUS: tuple[tuple[type[errors.TraceError], int], ...] = (
    (errors.MalformedBody, 400),
    (errors.PayloadTooLarge, 413),
    (errors.ValidationFailed, 422),
    (errors.UnsafeKey, 422),
    (errors.InvalidRequest, 400),
    (errors.Unauthenticated, 401),
    (errors.Forbidden, 403),
    (errors.NotFound, 404),
    (errors.Conflict, 409),
    (errors.Retryable, 503),
    (errors.SignerError, 500),
)


def status_for(exc: errors.TraceError) -> int:
    for cls, status in STATUS:
        if isinstance(exc, cls):
            return status
    return 500


def error_response(exc: errors.TraceError) -> web.Response:
    status = status_for(exc)
    headers = {"WWW-Authenticate": 'Bearer realm="trace"'} if status == 401 else None
    if status == 503:
        headers = {"Retry-After": "1"}
    return web.json_response(exc.to_dict(), status=status, headers=headers)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except errors.TraceError as exc:
        status = status_for(exc)
        level = logging.WARNING if status >= 500 else logging.INFO
        log.log(
            level,
            "request refused",
            extra={
                "path": request.path,
                "status": status,
                "error": exc.code,
                "detail": exc.message,
            },
        )
        return error_response(exc)
    except web.HTTPException as exc:
        if exc.status == 413:
            return error_response(errors.PayloadTooLarge("request body too large"))
        if exc.status >= 400:
            body = {"error": "http_error", "message": exc.reason}
            return web.json_response(body, status=exc.status)
        raise
    except Exception:
        log.exception("unhandled error", extra={"path": request.path})
        return web.json_response({"error": "internal", "message": "internal error"}, status=500)
