"""The Python runtime: a Lambda Runtime API client loop that runs a ``trace_udf`` handler.

Started by the runner (or as a Lambda custom runtime's ``bootstrap``) with the bundle root on
``sys.path`` and the environment of ``docs/architecture/udf.md``: ``AWS_LAMBDA_RUNTIME_API``,
``_HANDLER`` (``module.function``), ``TRACE_TASK_API_URL``. For each invocation:

1. ``GET /2018-06-01/runtime/invocation/next`` -- the event is the invoke payload;
2. call ``handler(ctx)`` (a coroutine function is run with ``asyncio.run``);
3. on success publish the collected rows (``/v1/task/buffer-publish``), then
   ``POST .../invocation/{id}/response`` with ``{"result", "final_events"}``;
4. on an exception ``POST .../invocation/{id}/error`` with ``errorType`` and
   ``errorMessage`` (``MemoryError`` keeps its name: the runner reports it as out of memory).

A handler that cannot be imported is reported on ``/runtime/init/error`` and the process exits.
Standard library only.
"""

from __future__ import annotations

import asyncio
import http.client
import importlib
import inspect
import json
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

from trace_udf._api import TaskApi
from trace_udf._context import Context, Invocation

_BASE = "/2018-06-01/runtime"


class RuntimeApi:
    """The runner (or Lambda) side of the loop."""

    def __init__(self, address: str) -> None:
        host, _, port = address.rpartition(":")
        self.host = host or "127.0.0.1"
        self.port = int(port)

    def _request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=None)
        try:
            conn.request(method, _BASE + path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def next(self) -> tuple[str, int | None, dict[str, Any]]:
        """Block for the next invocation: ``(request id, deadline ms, event)``."""
        status, headers, body = self._request("GET", "/invocation/next")
        if status != 200:
            raise RuntimeError(f"invocation/next answered {status}")
        deadline = headers.get("lambda-runtime-deadline-ms")
        event = json.loads(body)
        return headers["lambda-runtime-aws-request-id"], int(deadline) if deadline else None, event

    def respond(self, request_id: str, response: dict[str, Any]) -> None:
        data = json.dumps(response, separators=(",", ":")).encode()
        self._request("POST", f"/invocation/{request_id}/response", data, _JSON)

    def error(self, request_id: str, exc: BaseException) -> None:
        self._request(
            "POST", f"/invocation/{request_id}/error", _error_body(exc), _error_headers(exc)
        )

    def init_error(self, exc: BaseException) -> None:
        self._request("POST", "/init/error", _error_body(exc), _error_headers(exc))


_JSON = {"Content-Type": "application/json"}


def _error_body(exc: BaseException) -> bytes:
    lines = traceback.format_exception(type(exc), exc, exc.__traceback__)[-20:]
    doc = {"errorType": type(exc).__name__, "errorMessage": str(exc)[:2000], "stackTrace": lines}
    return json.dumps(doc).encode()


def _error_headers(exc: BaseException) -> dict[str, str]:
    return {**_JSON, "Lambda-Runtime-Function-Error-Type": type(exc).__name__}


def load_handler(spec: str) -> Callable[[Context], Any]:
    """``module.function`` -> the function. Raises ``ImportError`` / ``AttributeError``."""
    module_name, _, func_name = spec.rpartition(".")
    if not module_name:
        raise ImportError(f"handler {spec!r} is not module.function")
    handler = getattr(importlib.import_module(module_name), func_name)
    if not callable(handler):
        raise TypeError(f"handler {spec!r} is not callable")
    return handler  # type: ignore[no-any-return]


def invoke(handler: Callable[[Context], Any], ctx: Context) -> Any:
    """Call the handler (running a coroutine to completion) and check its return value.
    Raises ``TypeError`` for a value that is neither a dict nor None."""
    out = handler(ctx)
    if inspect.isawaitable(out):
        out = asyncio.run(_await(out))
    if out is not None and not isinstance(out, dict):
        raise TypeError(f"a handler returns a dict or None, not {type(out).__name__}")
    return out


async def _await(awaitable: Any) -> Any:
    return await awaitable


def serve_one(api: RuntimeApi, handler: Callable[[Context], Any], task_api_url: str) -> None:
    """Take one invocation, run it, answer it."""
    request_id, deadline_ms, event = api.next()
    try:
        invocation = Invocation.from_event(event, deadline_ms=deadline_ms, request_id=request_id)
        ctx = Context(invocation, TaskApi(task_api_url, invocation.capability_token))
        result = invoke(handler, ctx)
        ctx.publish_rows()
        response = {"result": result, "final_events": ctx.final_events}
        json.dumps(response)  # TypeError now, reported as the handler's error
    except MemoryError as exc:
        ctx = None  # drop what the handler held before reporting
        api.error(request_id, exc)
        return
    except Exception as exc:  # every handler failure is reported, none ends the loop
        api.error(request_id, exc)
        return
    api.respond(request_id, response)


def main() -> None:
    api = RuntimeApi(os.environ["AWS_LAMBDA_RUNTIME_API"])
    task_api_url = os.environ.get("TRACE_TASK_API_URL", "")
    try:
        handler = load_handler(os.environ.get("_HANDLER", ""))
    except Exception as exc:
        api.init_error(exc)
        sys.exit(1)
    while True:
        serve_one(api, handler, task_api_url)


if __name__ == "__main__":
    main()
