"""The task API over HTTP for UDF code: ``/v1/task/*`` with the attempt's capability token.

Standard library only (``http.client``), so a bundle needs nothing but the interpreter. A
refusal is raised as ``TaskApiError`` with the status and the error body's ``error`` code;
connection failures and 503 are retried a few times with backoff (every call here is fenced or
idempotent, so repeating one is safe).
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.parse
from typing import Any

CAPABILITY_HEADER = "X-Trace-Task-Capability"


class TaskApiError(Exception):
    """The task API refused a call (``status``, ``code``: the error body's ``error``)."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(f"{status} {code}: {message}" + (f" (field {field})" if field else ""))
        self.status = status
        self.code = code
        self.message = message
        self.field = field


class TaskApi:
    """Calls ``{base_url}/v1/task/...`` as one attempt."""

    def __init__(self, base_url: str, token: str, *, timeout_s: float = 60.0, tries: int = 4):
        parsed = urllib.parse.urlsplit(base_url)
        if parsed.scheme != "http" or not parsed.hostname:
            raise ValueError(f"the task API URL must be http://host:port, not {base_url!r}")
        self.host = parsed.hostname
        self.port = parsed.port or 80
        self.prefix = parsed.path.rstrip("/")
        self.token = token
        self.timeout_s = timeout_s
        self.tries = tries

    def call(self, path: str, body: dict[str, Any]) -> Any:
        """POST ``body`` to ``path`` (e.g. ``/v1/task/events``); returns the decoded answer.
        Raises ``TaskApiError`` (a refusal), ``OSError`` (unreachable after retries)."""
        data = json.dumps(body, separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json", CAPABILITY_HEADER: self.token}
        delay = 0.05
        for attempt in range(self.tries):
            conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)
            try:
                conn.request("POST", self.prefix + path, body=data, headers=headers)
                resp = conn.getresponse()
                raw = resp.read()
                status = resp.status
            except OSError:
                if attempt + 1 == self.tries:
                    raise
                time.sleep(delay)
                delay *= 4
                continue
            finally:
                conn.close()
            try:
                doc = json.loads(raw) if raw else None
            except ValueError:
                doc = None
            if status < 400:
                return doc
            if status == 503 and attempt + 1 < self.tries:
                time.sleep(delay)
                delay *= 4
                continue
            err = doc if isinstance(doc, dict) else {}
            raise TaskApiError(
                status,
                str(err.get("error", "http_error")),
                str(err.get("message", raw[:200].decode(errors="replace"))),
                err.get("field") if isinstance(err.get("field"), str) else None,
            )
        raise AssertionError("unreachable")
