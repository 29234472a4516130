"""The user API for datasets and org membership: ``/v1/orgs/{org}/...``, user JWT bearer.

A thin adapter over ``trace_lite.datasets.Datasets``: authenticate the user token
(``trace_lite.users``) from the ``Authorization`` header, read the caller's membership in
``{org}`` from Postgres, then -- only then -- read the body into its wire record
(``trace_servers.http``), and call the service, which applies ``trace_core.access``. Domain
errors map to status codes in ``trace_servers.http_errors``.

    GET    /v1/orgs/{org}/datasets                                   list what the caller may read
    GET    /v1/orgs/{org}/datasets/{dataset}                         versions and pointer sets
    POST   /v1/orgs/{org}/datasets/resolve                           pin names to versions
    DELETE /v1/orgs/{org}/pins/{pin_id}                              release a pin lease
    POST   /v1/orgs/{org}/datasets/{dataset}/versions/{version}/purge   (org admin)
    PUT    /v1/orgs/{org}/datasets/{dataset}/read-roles              (org admin)
    POST   /v1/orgs/{org}/dags/{dag}/cutover | rollback              (deployer/triggerer, admin)
    GET    /v1/orgs/{org}/members, PUT|DELETE /v1/orgs/{org}/members/{subject}   (org admin)
"""

from __future__ import annotations

import uuid
from typing import TypeVar

import attrs
from aiohttp import web

from trace_core import errors, json_limits, wire
from trace_core.access import UserCaller
from trace_lite.datasets import Datasets
from trace_lite.users import UserAuthenticator, UserIdentity
from trace_servers.http import DATASETS_KEY, decode_as, mark_authenticated, receive

T = TypeVar("T")

#: Path parameters (org, dataset, version, dag, subject, pin id) are text like body strings,
#: and short: no NUL or lone surrogate reaches SQL through a URL either.
PATH_LIMITS = json_limits.JsonLimits(max_string_chars=256)

#: Verifies user JWTs; None when the user API is not configured (every route answers 401).
USER_AUTH_KEY: web.AppKey[UserAuthenticator | None] = web.AppKey("user_auth")


def _service(request: web.Request) -> Datasets:
    return request.app[DATASETS_KEY]


def authenticate_user(request: web.Request) -> UserIdentity:
    """Verify the user JWT in ``Authorization``, then check the path parameters against
    ``PATH_LIMITS``. Raises ``Unauthenticated``, ``ValidationFailed`` (naming the parameter)."""
    auth = request.app[USER_AUTH_KEY]
    if auth is None:
        raise errors.Unauthenticated("user authentication is not configured")
    identity = auth.authenticate(request.headers.get("Authorization"))
    mark_authenticated(request, "user")
    for name, value in request.match_info.items():
        json_limits.check(value, path=name, limits=PATH_LIMITS)
    return identity


async def _caller(request: web.Request) -> UserCaller:
    """Authenticate the user JWT and read the caller's membership in ``{org}``."""
    identity = authenticate_user(request)
    return await _service(request).user_caller(request.match_info["org"], identity.subject)


async def _caller_and_body(request: web.Request, cls: type[T]) -> tuple[UserCaller, T]:
    """``_caller`` and the body as ``cls``: the bytes are received once the token verified,
    before the membership lookup, and decoded after it."""
    identity = authenticate_user(request)
    raw = await receive(request)
    caller = await _service(request).user_caller(request.match_info["org"], identity.subject)
    return caller, decode_as(request, raw, cls)


async def list_datasets(request: web.Request) -> web.Response:
    caller = await _caller(request)
    items = await _service(request).list_datasets(caller, request.match_info["org"])
    return web.json_response({"datasets": items})


async def show_dataset(request: web.Request) -> web.Response:
    caller = await _caller(request)
    m = request.match_info
    return web.json_response(await _service(request).show(caller, m["org"], m["dataset"]))


async def resolve(request: web.Request) -> web.Response:
    caller, req = await _caller_and_body(request, wire.ResolveRequest)
    res = await _service(request).resolve(
        caller, request.match_info["org"], req.datasets, pin_ttl_s=req.pin_ttl_s
    )
    return web.json_response(attrs.asdict(res))


async def release_pin(request: web.Request) -> web.Response:
    caller = await _caller(request)
    pin_id = request.match_info["pin_id"]
    try:
        uuid.UUID(pin_id)
    except ValueError:
        raise errors.ValidationFailed("pin_id must be a UUID", field="pin_id") from None
    await _service(request).release_pin(caller, request.match_info["org"], pin_id)
    return web.json_response({"released": pin_id})


async def purge(request: web.Request) -> web.Response:
    caller = await _caller(request)
    m = request.match_info
    report = await _service(request).purge(caller, m["org"], m["dataset"], m["version"])
    return web.json_response(attrs.asdict(report))


async def set_read_roles(request: web.Request) -> web.Response:
    caller, req = await _caller_and_body(request, wire.ReadRolesRequest)
    m = request.match_info
    out = await _service(request).set_read_roles(caller, m["org"], m["dataset"], req.read_roles)
    return web.json_response({"dataset": m["dataset"], "read_roles": out})


async def cutover(request: web.Request) -> web.Response:
    caller, req = await _caller_and_body(request, wire.CutoverRequest)
    m = request.match_info
    gen = await _service(request).cutover(caller, m["org"], m["dag"], req.pointers)
    return web.json_response({"dag": m["dag"], "active_generation": gen})


async def rollback(request: web.Request) -> web.Response:
    caller = await _caller(request)
    m = request.match_info
    gen = await _service(request).rollback(caller, m["org"], m["dag"])
    return web.json_response({"dag": m["dag"], "active_generation": gen})


async def list_members(request: web.Request) -> web.Response:
    caller = await _caller(request)
    members = await _service(request).list_members(caller, request.match_info["org"])
    return web.json_response({"members": members})


async def put_member(request: web.Request) -> web.Response:
    caller, req = await _caller_and_body(request, wire.MemberRequest)
    m = request.match_info
    return web.json_response(
        await _service(request).set_member(caller, m["org"], m["subject"], req.roles)
    )


async def delete_member(request: web.Request) -> web.Response:
    caller = await _caller(request)
    m = request.match_info
    await _service(request).remove_member(caller, m["org"], m["subject"])
    return web.json_response({"removed": m["subject"]})


def setup(app: web.Application, *, user_auth: UserAuthenticator | None) -> None:
    """Mount the user API on ``app`` (``DATASETS_KEY`` set); without ``user_auth`` every route
    answers 401."""
    app[USER_AUTH_KEY] = user_auth
    base = "/v1/orgs/{org}"
    app.add_routes(
        [
            web.get(f"{base}/datasets", list_datasets),
            web.post(f"{base}/datasets/resolve", resolve),
            web.get(f"{base}/datasets/{{dataset}}", show_dataset),
            web.post(f"{base}/datasets/{{dataset}}/versions/{{version}}/purge", purge),
            web.put(f"{base}/datasets/{{dataset}}/read-roles", set_read_roles),
            web.delete(f"{base}/pins/{{pin_id}}", release_pin),
            web.post(f"{base}/dags/{{dag}}/cutover", cutover),
            web.post(f"{base}/dags/{{dag}}/rollback", rollback),
            web.get(f"{base}/members", list_members),
            web.put(f"{base}/members/{{subject}}", put_member),
            web.delete(f"{base}/members/{{subject}}", delete_member),
        ]
    )


__all__ = ["PATH_LIMITS", "USER_AUTH_KEY", "authenticate_user", "setup"]
