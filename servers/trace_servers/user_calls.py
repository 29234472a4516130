"""How the ``trace`` CLI calls the user API as a user: the bearer of ``TRACE_USER_TOKEN``.

``trace datasets``, ``trace query`` and ``trace dag deploy|list|...`` act as the user whose JWT
is in ``TRACE_USER_TOKEN`` (``trace users token --sub you`` mints one locally); without it they
stop with a hint before any request is sent.
"""

from __future__ import annotations

import os
from typing import Any

from trace_lite.config import LiteSettings


def user_token() -> str:
    """The user JWT of ``TRACE_USER_TOKEN``. Raises ``SystemExit`` with a hint when unset."""
    token = os.environ.get("TRACE_USER_TOKEN")
    if not token:
        raise SystemExit("set TRACE_USER_TOKEN (e.g. $(trace users token --sub you))")
    return token


async def call_user_api(
    settings: LiteSettings, method: str, path: str, body: Any = None, *, deadline_s: float
) -> Any:
    """One user-API call to the Dispatcher of ``settings`` as the user of ``TRACE_USER_TOKEN``;
    returns the decoded JSON answer. Raises what ``DispatcherClient.request`` raises, and
    ``SystemExit`` without a token."""
    from trace_sdk import DispatcherClient

    token = user_token()
    async with DispatcherClient(settings.dispatcher_url, deadline_s=deadline_s) as client:
        client.session.headers["Authorization"] = f"Bearer {token}"
        return await client.request(method, path, json_body=body)
