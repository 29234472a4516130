"""The user API for datasets and org membership: ``/v1/orgs/{org}/...``, user JWT bearer.

A thin adapter over ``trace_lite.datasets.Datasets``: authenticate the user token
(``trace_lite.users``), read the caller's membership in ``{org}`` from Postgres, call the
service, which applies ``trace_core.access``. Domain errors map to status codes in
``trace_servers.http_errors``.

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
from typing import Any

import attrs
from aiohttp import web

from trace_core import errors, wire
from trace_core.access import UserCaller
from trace_lite.datasets import Datasets
from trace_lite.users import UserAuthenticator

DATASETS_KEY = web.AppKey("datasets", object)
USER_AUTH_KEY = web.AppKey("user_auth", object)


def setup(app: web.Application, dispatcher: Any, user_auth: UserAuthenticator | None) -> None:
    """Mount the routes; the ``Datasets`` service is built lazily from the Dispatcher's pool."""
    app[USER_AUTH_KEY] = user_auth
    app[DATASETS_KEY] = {"dispatcher": dispatcher, "service": None}
    app.add_routes(routes())


def _service(request: web.Request) -> Datasets:
    holder: dict[str, Any] = request.app[DATASETS_KEY]  # type: ignore[assignment]
    if holder["service"] is None:
        d = holder["dispatcher"]
        holder["service"] = Datasets(d.pool, object_store=d.object_store)
    service: Datasets = holder["service"]
    return service


async def _caller(request: web.Request) -> UserCaller:
    auth = request.app[USER_AUTH_KEY]
    if not isinstance(auth, UserAuthenticator):
        raise errors.Unauthenticated("user authentication is not configured")
    identity = auth.authenticate(request.headers.get("Authorization"))
    return await _service(request).user_caller(request.match_info["org"], identity.subject)


async def _json(request: web.Request) -> dict[str, Any]:
    from trace_servers.dispatcher import read_json

    body = await read_json(request)
    if not isinstance(body, dict):
        raise errors.MalformedBody("the body must be a JSON object", field="$")
    return body


def _str_list(body: dict[str, Any], name: str, *, min_items: int = 0) -> list[str]:
    value = body.get(name)
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise errors.ValidationFailed(f"{name} must be an array of non-empty strings", field=name)
    if not min_items <= len(value) <= 1000:
        raise errors.ValidationFailed(f"{name} must have {min_items} to 1000 items", field=name)
    return value


def _only(body: dict[str, Any], *names: str) -> None:
    extra = sorted(set(body) - set(names))
    if extra:
        raise errors.ValidationFailed(f"unknown field {extra[0]!r}", field=extra[0])


async def list_datasets(request: web.Request) -> web.Response:
    caller = await _caller(request)
    items = await _service(request).list_datasets(caller, request.match_info["org"])
    return web.json_response({"datasets": items})


async def show_dataset(request: web.Request) -> web.Response:
    caller = await _caller(request)
    m = request.match_info
    return web.json_response(await _service(request).show(caller, m["org"], m["dataset"]))


async def resolve(request: web.Request) -> web.Response:
    caller = await _caller(request)
    body = await _json(request)
    _only(body, "datasets", "pin_ttl_s")
    names = _str_list(body, "datasets", min_items=1)
    ttl = body.get("pin_ttl_s", 300)
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not 0 <= ttl <= 86_400:
        raise errors.ValidationFailed("pin_ttl_s must be between 0 and 86400", field="pin_ttl_s")
    res = await _service(request).resolve(
        caller, request.match_info["org"], names, pin_ttl_s=float(ttl)
    )
    return web.json_response(attrs.asdict(res))


async def task_resolve(request: web.Request) -> web.Response:
    """``/v1/task/resolve``: a running attempt resolves the datasets its token grants."""
    from trace_servers.dispatcher import CAPABILITY_HEADER, read_body

    if not request.headers.get(CAPABILITY_HEADER):
        raise errors.Unauthenticated("missing X-Trace-Task-Capability")
    req = await read_body(request, wire.TaskResolveRequest)
    holder: dict[str, Any] = request.app[DATASETS_KEY]  # type: ignore[assignment]
    dispatcher = holder["dispatcher"]
    claims = await dispatcher.authorize(
        request.headers.get(CAPABILITY_HEADER), req.task_id, req.attempt
    )
    await dispatcher.running_attempt(req)  # fenced: only the current, running attempt reads
    res = await _service(request).resolve_for_task(claims, req.datasets, pin_ttl_s=req.pin_ttl_s)
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
    caller = await _caller(request)
    body = await _json(request)
    _only(body, "read_roles")
    roles = _str_list(body, "read_roles")
    m = request.match_info
    out = await _service(request).set_read_roles(caller, m["org"], m["dataset"], roles)
    return web.json_response({"dataset": m["dataset"], "read_roles": out})


async def cutover(request: web.Request) -> web.Response:
    caller = await _caller(request)
    body = await _json(request)
    _only(body, "pointers")
    pointers = body.get("pointers")
    if (
        not isinstance(pointers, dict)
        or not pointers
        or not all(isinstance(v, str) for v in pointers.values())
    ):
        raise errors.ValidationFailed(
            "pointers must map dataset names to versions", field="pointers"
        )
    for name, version in pointers.items():
        try:
            uuid.UUID(version)
        except ValueError:
            raise errors.ValidationFailed(
                "versions must be UUIDs", field=f"pointers.{name}"
            ) from None
    m = request.match_info
    gen = await _service(request).cutover(caller, m["org"], m["dag"], pointers)
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
    caller = await _caller(request)
    body = await _json(request)
    _only(body, "roles")
    roles = _str_list(body, "roles")
    m = request.match_info
    return web.json_response(
        await _service(request).set_member(caller, m["org"], m["subject"], roles)
    )


async def delete_member(request: web.Request) -> web.Response:
    caller = await _caller(request)
    m = request.match_info
    await _service(request).remove_member(caller, m["org"], m["subject"])
    return web.json_response({"removed": m["subject"]})


def routes() -> list[web.RouteDef]:
    base = "/v1/orgs/{org}"
    return [
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
        web.post("/v1/task/resolve", task_resolve),
    ]


__all__ = ["routes", "setup"]
