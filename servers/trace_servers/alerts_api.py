"""The user API for alert destinations: ``/v1/orgs/{org}/alert-destinations``, user JWT bearer.

A thin adapter over ``trace_lite.alert_destinations.Destinations`` (rules, SSRF check, secrets):
verify the user token, receive the body, read the caller's membership in ``{org}``, decode the
body into its record (``trace_core.alert_destinations``), call the service. Secrets are
write-only: no answer carries one. Bad input is 422 with the field's path and nothing written.

    POST   /v1/orgs/{org}/alert-destinations          create (201; org admins)
    GET    /v1/orgs/{org}/alert-destinations          list (members)
    GET    /v1/orgs/{org}/alert-destinations/{name}   one (members)
    PATCH  /v1/orgs/{org}/alert-destinations/{name}   change name, url, enabled, secrets (admins)
    DELETE /v1/orgs/{org}/alert-destinations/{name}   delete; its due deliveries are disabled

The SSRF allow-list of the server is ``TRACE_DELIVERY_ALLOW`` (comma-separated CIDRs; tests
admit the local receiver), as for ``trace delivery run``.
"""

from __future__ import annotations

import os
from typing import Any

from aiohttp import web

from trace_core import errors, wire
from trace_core.access import UserCaller
from trace_core.alert_destinations import DestinationCreate, DestinationOut, DestinationUpdate
from trace_core.ssrf import AllowList
from trace_lite.alert_destinations import Destinations
from trace_servers import user_api
from trace_servers.http import decode_as, receive

DESTINATIONS_KEY = web.AppKey("alert_destinations", Destinations)


def _service(request: web.Request) -> Destinations:
    return request.app[DESTINATIONS_KEY]


async def _caller(request: web.Request, subject: str) -> UserCaller:
    return await _service(request).orgs.user_caller(request.match_info["org"], subject)


def _json(d: DestinationOut) -> dict[str, Any]:
    doc: dict[str, Any] = wire.unstructure(d)
    return doc


async def create(request: web.Request) -> web.Response:
    subject = user_api.authenticate_user(request).subject
    raw = await receive(request)
    caller = await _caller(request, subject)
    req = decode_as(request, raw, DestinationCreate)
    dest, _generated = await _service(request).create(caller, request.match_info["org"], req)
    return web.json_response(_json(dest), status=201)


async def list_destinations(request: web.Request) -> web.Response:
    caller = await _caller(request, user_api.authenticate_user(request).subject)
    found = await _service(request).list(caller, request.match_info["org"])
    return web.json_response({"destinations": [_json(d) for d in found]})


async def get_destination(request: web.Request) -> web.Response:
    caller = await _caller(request, user_api.authenticate_user(request).subject)
    m = request.match_info
    return web.json_response(_json(await _service(request).get(caller, m["org"], m["name"])))


async def update(request: web.Request) -> web.Response:
    subject = user_api.authenticate_user(request).subject
    raw = await receive(request)
    caller = await _caller(request, subject)
    req = decode_as(request, raw, DestinationUpdate)
    m = request.match_info
    return web.json_response(
        _json(await _service(request).update(caller, m["org"], m["name"], req))
    )


async def delete(request: web.Request) -> web.Response:
    caller = await _caller(request, user_api.authenticate_user(request).subject)
    m = request.match_info
    disabled = await _service(request).delete(caller, m["org"], m["name"])
    return web.json_response({"deleted": m["name"], "deliveries_disabled": disabled})


def allow_from_env() -> AllowList:
    """``TRACE_DELIVERY_ALLOW`` as an allow-list. Raises ``ValidationFailed``."""
    raw = os.environ.get("TRACE_DELIVERY_ALLOW", "")
    return AllowList.of(c.strip() for c in raw.split(",") if c.strip())


class NoSecretStore:
    """The secret store of a server configured without one: every call is ``Unavailable``."""

    async def put(self, name: str, value: bytes) -> None:
        raise errors.Unavailable("this server has no secret store")

    async def get(self, name: str) -> bytes:
        raise errors.Unavailable("this server has no secret store")

    async def delete(self, name: str) -> None:
        raise errors.Unavailable("this server has no secret store")

    async def list(self, prefix: str) -> list[str]:
        raise errors.Unavailable("this server has no secret store")


def setup(app: web.Application, *, destinations: Destinations) -> None:
    """Mount the destination routes on ``app`` (after ``user_api.setup``)."""
    app[DESTINATIONS_KEY] = destinations
    base = "/v1/orgs/{org}/alert-destinations"
    app.add_routes(
        [
            web.post(base, create),
            web.get(base, list_destinations),
            web.get(f"{base}/{{name}}", get_destination),
            web.patch(f"{base}/{{name}}", update),
            web.delete(f"{base}/{{name}}", delete),
        ]
    )


__all__ = ["DESTINATIONS_KEY", "NoSecretStore", "allow_from_env", "setup"]
