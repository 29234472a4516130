"""The user API for DAGs: ``/v1/orgs/{org}/dags/...``, user JWT bearer.

A thin adapter over ``trace_lite.dags.Dags`` (deploy, list, show, versions) and
``trace_lite.dag_runs.DagRuns`` (manual triggers). Like ``trace_servers.user_api``: verify the
user token, receive the body, read the caller's membership in ``{org}``, decode the body into
its wire record, call the service (which applies ``trace_core.access``).

A deploy takes the DAG file's *parsed* document as JSON, ``{"spec": {...}}``: the CLI reads the
YAML (``trace_lite.dag_files``, with line numbers) and the server never parses YAML. A refused
document answers 422 with every problem in ``details.problems`` (``[{path, message, hint,
line}]``).

    POST /v1/orgs/{org}/dags[?dry_run=true]            deploy (201 new version, 200 unchanged)
                                                       or preview the diff (dry run, 200)
    GET  /v1/orgs/{org}/dags                           the org's DAGs and active versions
    GET  /v1/orgs/{org}/dags/{dag}                     the active version's spec and datasets
    GET  /v1/orgs/{org}/dags/{dag}/versions            every version, newest first
    POST /v1/orgs/{org}/dags/{dag}/jobs/{job}/trigger  run a source job (201 new run, 200 the
                                                       run id's existing task)
    POST /v1/orgs/{org}/dags/{dag}/versions/rollback   restore the previous version and its
                                                       pointer set; cancel the rolled-back
                                                       version's work (``trace_lite.dag_control``;
                                                       ``.../dags/{dag}/rollback`` of the user API
                                                       moves the pointer set alone)
    POST /v1/orgs/{org}/dags/{dag}/runs/{run_id}/cancel
                                                       cancel a run's unfinished tasks
    POST /v1/orgs/{org}/dags/{dag}/versions/{version}/cancel
                                                       cancel a version's unfinished tasks
    GET  /v1/orgs/{org}/dags/{dag}/status              the active version, task counts per job,
                                                       the rebuild of a staged version
    POST /v1/orgs/{org}/datasets/{dataset}/invalidate  rerun the DAG tasks that read a replaced
                                                       range or partition key of the dataset
                                                       (``trace_lite.dag_invalidations``)
"""

from __future__ import annotations

import re

from aiohttp import web

from trace_core import errors, wire
from trace_core.access import UserCaller
from trace_lite.dag_control import DagControl
from trace_lite.dag_invalidations import Invalidations
from trace_lite.dag_runs import DagRuns
from trace_lite.dags import Dags
from trace_servers import user_api
from trace_servers.http import decode_as, receive

DAGS_KEY = web.AppKey("dags", Dags)
DAG_RUNS_KEY = web.AppKey("dag_runs", DagRuns)
DAG_CONTROL_KEY = web.AppKey("dag_control", DagControl)
INVALIDATIONS_KEY = web.AppKey("dag_invalidations", Invalidations)

#: A run id in a path: a trigger's ``run_id`` (``wire.DagTriggerRequest``) or a schedule slot.
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:+\-]{0,199}$")


def _dags(request: web.Request) -> Dags:
    return request.app[DAGS_KEY]


def _subject(request: web.Request) -> str:
    """The user API's authentication (``user_api.authenticate_user``: the user JWT, then the path
    parameters' limits), one rule for every ``/v1/orgs`` route. Raises ``Unauthenticated``,
    ``ValidationFailed``."""
    return user_api.authenticate_user(request).subject


async def _caller(request: web.Request) -> UserCaller:
    subject = _subject(request)
    return await _dags(request).user_caller(request.match_info["org"], subject)


def _dry_run(request: web.Request) -> bool:
    value = request.query.get("dry_run", "false")
    if value not in ("true", "false"):
        raise errors.ValidationFailed("dry_run must be true or false", field="dry_run")
    return value == "true"


async def deploy(request: web.Request) -> web.Response:
    subject = _subject(request)
    dry_run = _dry_run(request)
    raw = await receive(request)
    caller = await _dags(request).user_caller(request.match_info["org"], subject)
    req = decode_as(request, raw, wire.DagDeployRequest)
    out = await _dags(request).deploy(caller, request.match_info["org"], req.spec, dry_run=dry_run)
    return web.json_response(out.to_dict(), status=201 if out.created else 200)


async def list_dags(request: web.Request) -> web.Response:
    caller = await _caller(request)
    return web.json_response(
        {"dags": await _dags(request).list_dags(caller, request.match_info["org"])}
    )


async def show_dag(request: web.Request) -> web.Response:
    caller = await _caller(request)
    m = request.match_info
    return web.json_response(await _dags(request).show(caller, m["org"], m["dag"]))


async def dag_versions(request: web.Request) -> web.Response:
    caller = await _caller(request)
    m = request.match_info
    versions = await _dags(request).versions(caller, m["org"], m["dag"])
    return web.json_response({"dag": m["dag"], "versions": versions})


async def trigger(request: web.Request) -> web.Response:
    subject = _subject(request)
    raw = await receive(request)
    m = request.match_info
    caller = await _dags(request).user_caller(m["org"], subject)
    req = decode_as(request, raw, wire.DagTriggerRequest)
    out = await request.app[DAG_RUNS_KEY].trigger(
        caller, m["org"], m["dag"], m["job"], payload=req.payload, run_id=req.run_id
    )
    return web.json_response(out, status=201 if out["created"] else 200)


def _control(request: web.Request) -> DagControl:
    return request.app[DAG_CONTROL_KEY]


def _version(request: web.Request) -> int:
    raw = request.match_info["version"]
    if not raw.isdigit() or not 1 <= int(raw) <= 2**62:
        raise errors.ValidationFailed("version must be a positive integer", field="version")
    return int(raw)


def _run_id(request: web.Request) -> str:
    run_id = request.match_info["run_id"]
    if not _RUN_ID.match(run_id):
        raise errors.ValidationFailed(f"run_id must match {_RUN_ID.pattern}", field="run_id")
    return run_id


async def rollback(request: web.Request) -> web.Response:
    caller = await _caller(request)
    m = request.match_info
    out = await _control(request).rollback(caller, m["org"], m["dag"])
    return web.json_response(out.to_dict())


async def cancel_run(request: web.Request) -> web.Response:
    subject = _subject(request)
    run_id = _run_id(request)
    m = request.match_info
    caller = await _dags(request).user_caller(m["org"], subject)
    return web.json_response(await _control(request).cancel_run(caller, m["org"], m["dag"], run_id))


async def cancel_version(request: web.Request) -> web.Response:
    subject = _subject(request)
    version = _version(request)
    m = request.match_info
    caller = await _dags(request).user_caller(m["org"], subject)
    out = await _control(request).cancel_version(caller, m["org"], m["dag"], version)
    return web.json_response(out)


async def dag_status(request: web.Request) -> web.Response:
    caller = await _caller(request)
    m = request.match_info
    return web.json_response(await _control(request).status(caller, m["org"], m["dag"]))


async def invalidate(request: web.Request) -> web.Response:
    subject = _subject(request)
    raw = await receive(request)
    m = request.match_info
    caller = await _dags(request).user_caller(m["org"], subject)
    req = decode_as(request, raw, wire.DagInvalidateRequest)
    out = await request.app[INVALIDATIONS_KEY].invalidate(
        caller,
        m["org"],
        m["dataset"],
        start=req.start,
        end=req.end,
        key=req.key,
        version=req.version,
    )
    return web.json_response(out.to_dict())


def setup(
    app: web.Application, *, dags: Dags, runs: DagRuns, control: DagControl | None = None
) -> None:
    """Mount the DAG routes on ``app`` (after ``user_api.setup``, which sets the user
    authenticator). ``control`` defaults to one over the same pool and orgs as ``dags``."""
    app[DAGS_KEY] = dags
    app[DAG_RUNS_KEY] = runs
    app[DAG_CONTROL_KEY] = control or DagControl(dags.pool, orgs=dags.orgs)
    app[INVALIDATIONS_KEY] = Invalidations(dags.pool, wake_mode=runs.wake_mode, orgs=dags.orgs)
    base = "/v1/orgs/{org}/dags"
    app.add_routes(
        [
            web.post(base, deploy),
            web.get(base, list_dags),
            web.get(f"{base}/{{dag}}", show_dag),
            web.get(f"{base}/{{dag}}/versions", dag_versions),
            web.post(f"{base}/{{dag}}/jobs/{{job}}/trigger", trigger),
            web.post(f"{base}/{{dag}}/versions/rollback", rollback),
            web.post(f"{base}/{{dag}}/runs/{{run_id}}/cancel", cancel_run),
            web.post(f"{base}/{{dag}}/versions/{{version}}/cancel", cancel_version),
            web.get(f"{base}/{{dag}}/status", dag_status),
            web.post("/v1/orgs/{org}/datasets/{dataset}/invalidate", invalidate),
        ]
    )


__all__ = [
    "DAGS_KEY",
    "DAG_CONTROL_KEY",
    "DAG_RUNS_KEY",
    "INVALIDATIONS_KEY",
    "setup",
]
