"""The Dispatcher's HTTP server, by its old name: ``make_app`` lives in ``trace_servers.app``.

Kept so ``from trace_servers.dispatcher import make_app`` (the CLI, older tests) still works.
The pieces: ``trace_servers.http`` (bodies, credentials, responses), ``trace_servers.task_api``
(``/internal/*``, ``/v1/task/*``), ``trace_servers.user_api`` (``/v1/orgs/...``).
"""

from __future__ import annotations

from trace_servers.app import make_app
from trace_servers.http import CAPABILITY_HEADER, MAX_BODY, read_json
from trace_servers.http_errors import status_for

__all__ = ["CAPABILITY_HEADER", "MAX_BODY", "make_app", "read_json", "status_for"]
