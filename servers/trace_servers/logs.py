"""Structured JSON logs: one object per line, with ``task_id``/``attempt`` whenever known.

Request handlers bind ``task_id`` and ``attempt`` in a context variable; every record logged
while handling that request carries them, as do records passed ``extra={"task_id": ...}``.

A malformed HTTP request (a bad request line, header or length, refused by aiohttp's parser
before any handler runs) is the client's mistake: it is logged at ``info`` without a traceback
(``ClientHttpErrors``), not as an error of the server.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from typing import Any

from aiohttp.http_exceptions import HttpProcessingError

_context: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "trace_log_context", default=None
)

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


def bind(**fields: Any) -> None:
    """Attach fields (for example ``task_id``, ``attempt``) to every record in this context."""
    current = dict(_context.get() or {})
    current.update({k: v for k, v in fields.items() if v is not None})
    _context.set(current)


def clear() -> None:
    _context.set(None)


class JsonFormatter(logging.Formatter):
    def __init__(self, component: str) -> None:
        super().__init__()
        self.component = component

    def format(self, record: logging.LogRecord) -> str:
        body: dict[str, Any] = {
            "ts": round(time.time(), 3),
            "level": record.levelname.lower(),
            "component": self.component,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        body.update(_context.get() or {})
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                body[key] = value
        if record.exc_info:
            body["exc"] = self.formatException(record.exc_info)
        return json.dumps(body, default=str)


class ClientHttpErrors(logging.Filter):
    """Log aiohttp's refusals of malformed requests (4xx parse errors) as ``info``, without a
    traceback; everything else passes unchanged."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError) and 400 <= exc.code < 500:
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg, record.args = "malformed HTTP request refused", ()
            record.exc_info = record.exc_text = None
            record.__dict__["status"] = exc.code
        return True


def setup(component: str, level: str = "INFO") -> None:
    """Send JSON log lines for ``component`` to stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(component))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, ClientHttpErrors) for f in server_log.filters):
        server_log.addFilter(ClientHttpErrors())
