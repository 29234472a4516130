"""A local webhook receiver for the delivery tests: aiohttp on loopback, answering from a script.

Every request is verified per Standard Webhooks (``standardwebhooks``), recorded, and accepted
at most once per ``webhook-id`` (a 2xx for an id already accepted is answered again without
counting it): what a well-behaved receiver does, so "effectively once" is observable as
``accepted`` holding each id once. ``script`` is consumed one entry per request: an int status
(with ``retry_after`` for 429), ``"timeout"`` (answer after ``hang_s``) or ``"reset"`` (drop
the connection); when it runs out, 200.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Mapping
from typing import Any

import attrs
from aiohttp import web
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

Step = int | str


@attrs.define
class Received:
    webhook_id: str
    headers: Mapping[str, str]
    body: bytes
    valid: bool


class WebhookReceiver:
    def __init__(self, secret: str, *, hang_s: float = 5.0) -> None:
        self.secret = secret
        self.hang_s = hang_s
        self.script: list[Step] = []
        self.retry_after = "0"
        self.requests: list[Received] = []
        self.accepted: list[str] = []
        self.max_in_progress: dict[str, int] = {}
        self._active: dict[str, int] = {}
        self._runner: web.AppRunner | None = None
        self.port = 0
        self.gate: asyncio.Event | None = None  # when set, requests wait for it

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        try:
            Webhook(self.secret).verify(body, headers, json_parse=False)
            valid = True
        except WebhookVerificationError:
            valid = False
        msg_id = headers.get("webhook-id", "")
        self.requests.append(Received(msg_id, headers, body, valid))
        self._active[msg_id] = self._active.get(msg_id, 0) + 1
        self.max_in_progress[msg_id] = max(
            self.max_in_progress.get(msg_id, 0), self._active[msg_id]
        )
        try:
            if self.gate is not None:
                await self.gate.wait()
            step: Step = self.script.pop(0) if self.script else 200
            if step == "timeout":
                # the sender gives up long before this answer: it no longer counts as a send
                # in progress (aiohttp does not cancel the handler when the client leaves)
                self._active[msg_id] -= 1
                try:
                    await asyncio.sleep(self.hang_s)
                finally:
                    self._active[msg_id] += 1
                step = 200
            if step == "reset":
                assert request.transport is not None
                sock = request.transport.get_extra_info("socket")
                if sock is not None:  # RST instead of FIN
                    linger = struct.pack("ii", 1, 0)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
                request.transport.close()
                return web.Response(status=200)
            assert isinstance(step, int)
            if 200 <= step < 300 and valid and msg_id not in self.accepted:
                self.accepted.append(msg_id)
            headers_out = {"Retry-After": self.retry_after} if step == 429 else {}
            return web.Response(status=step, text="x" * 10, headers=headers_out)
        finally:
            self._active[msg_id] -= 1

    async def start(self) -> WebhookReceiver:
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        app.router.add_post("/redirect", self._redirect)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server: Any = site._server
        self.port = server.sockets[0].getsockname()[1]
        return self

    async def _redirect(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        self.requests.append(Received("", dict(request.headers), b"", False))
        raise web.HTTPFound(location=f"http://127.0.0.1:{self.port}/hook")

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
