"""HTTP plumbing both APIs share: credentials from headers, request bodies, JSON answers.

Every JSON route takes the same steps, in this order (``docs/architecture/contracts.md``,
"Input limits"):

1. **A credential from the headers** -- the platform bearer (``require_platform``), an
   attempt's capability token (``capability_token``, then ``authenticate_task``) or a user JWT
   (``trace_servers.user_api``). A request without one is refused before its body is read.
2. ``receive``: ``Content-Type`` must be ``application/json`` (415 ``unsupported_media_type``)
   and at most the route's byte limit is read (413 ``payload_too_large``), counted while
   reading, so a chunked body without ``Content-Length`` is cut off too. These are bytes only,
   never looked into; a route whose check awaits (a token verification, a membership lookup)
   receives them first, so a client that sends its request and hangs up is still served.
3. The credential is verified; ``mark_authenticated`` records it. ``decode`` refuses to look at
   the bytes of a request nothing marked, so no unauthenticated body is ever parsed.
4. ``trace_core.json_limits.loads`` parses them: not JSON is 400 ``malformed_body``; values
   PostgreSQL cannot store or over a limit (NUL, lone surrogates, NaN/Infinity, overflowing
   numbers, integers over 2**256, nesting over 64) are 422 ``validation_failed`` with the path.
5. ``trace_core.wire.structure`` builds the route's record, strictly (422 with the path).

The ``Server`` header names no software version (``hide_server_version``).
"""

from __future__ import annotations

import hmac
import time
from typing import Any, TypeVar

from aiohttp import web, web_response

from trace_core import errors, json_limits, wire
from trace_core.token import CapabilityClaims, check_binding
from trace_lite.datasets import Datasets
from trace_lite.dispatcher import Dispatcher
from trace_servers import logs

T = TypeVar("T")

#: Body limit of every JSON route but the two batch routes (``docs/standards/operations.md``).
MAX_BODY = 1024 * 1024
#: Batch task creation and batch completion mirror Lambda's synchronous payload limit.
MAX_BATCH_BODY = 6 * 1000 * 1000

CAPABILITY_HEADER = "X-Trace-Task-Capability"
JSON_TYPE = "application/json"
#: What the ``Server`` header says instead of aiohttp's and Python's versions.
SERVER_NAME = "trace"

DISPATCHER_KEY = web.AppKey("dispatcher", Dispatcher)
#: The dataset service of both APIs (``/v1/orgs/...`` and ``/v1/task/resolve``).
DATASETS_KEY = web.AppKey("datasets", Datasets)
PLATFORM_TOKEN_KEY = web.AppKey("platform_token", str)
#: Set on a request once its credential checked out: ``decode`` needs it.
AUTHENTICATED_KEY = web.RequestKey("authenticated", str)


# --- credentials -----------------------------------------------------------------------------


def mark_authenticated(request: web.Request, how: str) -> None:
    """Record that ``request`` carries a verified credential (``how``: which kind)."""
    request[AUTHENTICATED_KEY] = how


def require_platform(request: web.Request) -> None:
    """Only platform components may call ``/internal/*``.

    Returns None. Raises ``Unauthenticated`` without a valid platform credential, ``Forbidden``
    for a capability token (it is never a platform credential).
    """
    expected = request.app[PLATFORM_TOKEN_KEY]
    scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not presented:
        if CAPABILITY_HEADER in request.headers:
            raise errors.Forbidden("capability tokens cannot call /internal routes")
        raise errors.Unauthenticated("platform credential required")
    if not hmac.compare_digest(presented.encode(), expected.encode()):
        raise errors.Unauthenticated("invalid platform credential")
    mark_authenticated(request, "platform")


def capability_token(request: web.Request) -> str:
    """The token in ``X-Trace-Task-Capability``, unverified. Raises ``Unauthenticated``."""
    token = request.headers.get(CAPABILITY_HEADER)
    if not token:
        raise errors.Unauthenticated("missing X-Trace-Task-Capability")
    return token


async def authenticate_task(request: web.Request, token: str) -> CapabilityClaims:
    """Verify a capability token -- signature, expiry, and its claims against its task row
    (``Dispatcher.check_claims``) -- before the body is parsed.

    Returns the verified claims; ``bind_fence`` then ties them to the body's fence. Raises
    ``Unauthenticated``, ``Unavailable``.
    """
    dispatcher = request.app[DISPATCHER_KEY]
    claims = await dispatcher.verifier.verify(
        token, now_epoch=int(time.time()), monotonic=time.monotonic()
    )
    await dispatcher.check_claims(claims)
    mark_authenticated(request, "capability")
    logs.bind(task_id=claims.task_id, attempt=claims.attempt)
    return claims


def bind_fence(claims: CapabilityClaims, fence: wire.FenceFields) -> None:
    """The body's fence must name the token's own task and attempt. Raises ``Forbidden``."""
    check_binding(claims, fence.task_id, fence.attempt)


# --- bodies ----------------------------------------------------------------------------------


async def receive(request: web.Request, limit: int = MAX_BODY) -> bytes:
    """The body's bytes, not looked into: call it once a credential is presented.

    Raises ``UnsupportedMediaType`` (not ``application/json``), ``PayloadTooLarge``,
    ``MalformedBody`` (empty).
    """
    if request.content_type != JSON_TYPE:
        raise errors.UnsupportedMediaType(f"Content-Type must be {JSON_TYPE}")
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
    return raw


def decode(request: web.Request, raw: bytes) -> Any:
    """The JSON value of an authenticated request's body (``trace_core.json_limits.loads``).

    Raises ``MalformedBody`` (not JSON), ``ValidationFailed`` (a value over the limits, with
    its field path); ``RuntimeError`` when nothing authenticated the request -- a bug in this
    server, answered 500 without looking at the body.
    """
    if AUTHENTICATED_KEY not in request:
        raise RuntimeError(f"{request.path}: body decoded before authentication")
    return json_limits.loads(raw)


def decode_as(request: web.Request, raw: bytes, cls: type[T]) -> T:
    """``decode``, then the wire record ``cls`` (``ValidationFailed`` with the path)."""
    return wire.structure(decode(request, raw), cls)


async def read_json(request: web.Request, limit: int = MAX_BODY) -> Any:
    """``receive`` and ``decode`` the body of a request already authenticated."""
    return decode(request, await receive(request, limit))


async def read_body(request: web.Request, cls: type[T], limit: int = MAX_BODY) -> T:
    """``read_json``, then the wire record ``cls``."""
    return wire.structure(await read_json(request, limit), cls)


# --- responses -------------------------------------------------------------------------------


def ok(obj: Any, status: int = 200) -> web.Response:
    """A JSON answer with the wire form of ``obj``."""
    return web.json_response(wire.unstructure(obj), status=status)


async def hide_server_version(_request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: name no server or Python version."""
    response.headers["Server"] = SERVER_NAME


# aiohttp answers malformed HTTP (bad request line, header, length) itself, before any app or
# signal runs, with the default ``Server`` value: replace that default too. Tests check both
# paths (tests/e2e/test_hostile_json.py).
vars(web_response)["SERVER_SOFTWARE"] = SERVER_NAME  # a module global aiohttp does not export


__all__ = [
    "AUTHENTICATED_KEY",
    "CAPABILITY_HEADER",
    "DATASETS_KEY",
    "DISPATCHER_KEY",
    "MAX_BATCH_BODY",
    "MAX_BODY",
    "PLATFORM_TOKEN_KEY",
    "authenticate_task",
    "bind_fence",
    "capability_token",
    "decode",
    "decode_as",
    "hide_server_version",
    "mark_authenticated",
    "ok",
    "read_body",
    "read_json",
    "receive",
    "require_platform",
]
