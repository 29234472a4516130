"""Domain errors → HTTP, in one table, and the JSON error body every route returns.

An error body carries only Trace's own words: ``{error, message, field?, details?}`` from the
domain error. Anything else a handler raises (a driver error, a bug) is logged with its
traceback and answered with a generic 500 ``internal``: no backend text, no exception name.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from trace_core import errors

log = logging.getLogger("trace.http")

#: Most specific class first; the first ``isinstance`` match wins.
STATUS: tuple[tuple[type[errors.TraceError], int], ...] = (
    (errors.MalformedBody, 400),
    (errors.PayloadTooLarge, 413),
    (errors.UnsupportedMediaType, 415),
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


def public_message(exc: errors.TraceError) -> str:
    """What a caller may read of ``exc``: its message for the caller's own mistakes (4xx), the
    class's fixed default for server-side failures (5xx), whose messages may name a driver or
    an exception (they are logged instead)."""
    if status_for(exc) < 500:
        return exc.message
    return (type(exc).__doc__ or exc.code).strip().splitlines()[0]


def error_body(exc: errors.TraceError) -> dict[str, Any]:
    """The JSON error body of ``exc``: ``{error, message, field?, details?}``."""
    body = exc.to_dict()
    body["message"] = public_message(exc)
    if status_for(exc) >= 500:
        body.pop("details", None)
    return body


def error_response(exc: errors.TraceError) -> web.Response:
    status = status_for(exc)
    headers = {"WWW-Authenticate": 'Bearer realm="trace"'} if status == 401 else None
    if status == 503:
        headers = {"Retry-After": "1"}
    return web.json_response(error_body(exc), status=status, headers=headers)


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
            return web.json_response(body, status=exc.status, headers=_allow(exc))
        raise
    except Exception:
        log.exception("unhandled error", extra={"path": request.path})
        return web.json_response({"error": "internal", "message": "internal error"}, status=500)


def _allow(exc: web.HTTPException) -> dict[str, str] | None:
    allow = exc.headers.get("Allow")
    return {"Allow": allow} if allow else None
