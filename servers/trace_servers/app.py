"""The Dispatcher's aiohttp application: the task API and the user API on one server.

``make_app`` composes ``trace_servers.task_api`` (``/internal/*``, ``/v1/task/*``) and
``trace_servers.user_api`` (``/v1/orgs/...``) over one ``Dispatcher`` and one ``Datasets``
service, and adds what every route shares: the error middleware (``http_errors``), request
metrics, structured-log context, a ``Server`` header without versions, and the unauthenticated
operations endpoints ``/healthz``, ``/readyz``, ``/metrics``. Background work (reaper, outbox
publisher) runs outside the app (``trace_servers.cli``).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import attrs
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from trace_core import errors
from trace_core.ports import SecretStore
from trace_lite.alert_destinations import Destinations
from trace_lite.dag_runs import DagRuns
from trace_lite.dags import Dags
from trace_lite.datasets import Datasets
from trace_lite.dispatcher import Dispatcher
from trace_lite.users import UserAuthenticator
from trace_servers import alerts_api, dag_api, logs, query_api, task_api, user_api
from trace_servers.dag_cli import builtin_operators
from trace_servers.http import (
    DATASETS_KEY,
    DISPATCHER_KEY,
    MAX_BATCH_BODY,
    PLATFORM_TOKEN_KEY,
    hide_server_version,
)
from trace_servers.http_errors import error_middleware
from trace_servers.task_api import CredentialMinter


@attrs.frozen
class Metrics:
    """The Prometheus collectors ``/metrics`` serves."""

    registry: CollectorRegistry
    requests: Counter
    latency: Histogram
    tasks: Gauge
    outbox: Gauge
    partitions: Gauge

    @classmethod
    def create(cls) -> Metrics:
        registry = CollectorRegistry()
        return cls(
            registry=registry,
            requests=Counter(
                "trace_http_requests", "HTTP requests", ["route", "status"], registry=registry
            ),
            latency=Histogram(
                "trace_http_request_seconds",
                "HTTP request latency",
                ["route"],
                registry=registry,
                buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
            ),
            tasks=Gauge("trace_tasks", "Tasks by state", ["state"], registry=registry),
            outbox=Gauge("trace_outbox_rows", "Outbox rows by state", ["state"], registry=registry),
            partitions=Gauge(
                "trace_dataset_partitions",
                "Dataset partitions by state (corrupt > 0 is an alarm)",
                ["state"],
                registry=registry,
            ),
        )


METRICS_KEY = web.AppKey("metrics", Metrics)


# --- operations ------------------------------------------------------------------------------


async def healthz(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    try:
        await request.app[DISPATCHER_KEY].counts()
    except errors.TraceError as exc:
        return web.json_response({"status": "unavailable", "error": exc.code}, status=503)
    return web.json_response({"status": "ready"})


async def metrics(request: web.Request) -> web.Response:
    m = request.app[METRICS_KEY]
    dispatcher = request.app[DISPATCHER_KEY]
    try:
        for state, n in (await dispatcher.counts()).items():
            m.tasks.labels(state).set(n)
        for state, n in (await dispatcher.outbox_counts()).items():
            m.outbox.labels(state).set(n)
        for state, n in (await request.app[DATASETS_KEY].partition_counts()).items():
            m.partitions.labels(state).set(n)
    except errors.TraceError:
        pass  # still serve the request metrics
    return web.Response(
        body=generate_latest(m.registry), headers={"Content-Type": "text/plain; version=0.0.4"}
    )


@web.middleware
async def observe_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    logs.clear()
    started = time.perf_counter()
    resource = request.match_info.route.resource
    route = resource.canonical if resource else "?"
    response = await handler(request)
    m = request.app[METRICS_KEY]
    m.requests.labels(route, str(response.status)).inc()
    m.latency.labels(route).observe(time.perf_counter() - started)
    return response


def make_app(
    dispatcher: Dispatcher,
    *,
    platform_token: str,
    extra_routes: list[web.RouteDef] | None = None,
    credential_minter: CredentialMinter | None = None,
    user_auth: UserAuthenticator | None = None,
    data_url: str | None = None,
    secret_store: SecretStore | None = None,
) -> web.Application:
    """The Dispatcher's aiohttp application (no background work: see ``trace_servers.cli``).

    ``user_auth`` enables the user API ``/v1/orgs/...``; without it those routes answer 401.
    ``credential_minter`` (AWS profile) enables ``/v1/task/credentials``. ``data_url`` (the data
    database) lets the Query Service read Postgres-table datasets. ``secret_store`` keeps alert
    destinations' signing secrets (``alerts_api``; without it those routes answer 503).
    ``extra_routes``: the profile's own routes (Lite: the local object store's signed URLs). Raises
    ``ValidationFailed`` for a platform credential shorter than 16 characters.
    """
    if len(platform_token) < 16:
        raise errors.ValidationFailed("the platform credential must be at least 16 characters")
    app = web.Application(
        middlewares=[observe_middleware, error_middleware], client_max_size=MAX_BATCH_BODY
    )
    app[DISPATCHER_KEY] = dispatcher
    app[DATASETS_KEY] = Datasets(dispatcher.pool, object_store=dispatcher.object_store)
    app[PLATFORM_TOKEN_KEY] = platform_token
    app[METRICS_KEY] = Metrics.create()
    app.on_response_prepare.append(hide_server_version)
    task_api.setup(app, credential_minter=credential_minter)
    user_api.setup(app, user_auth=user_auth)
    query_api.setup(app, data_url=data_url, registry=app[METRICS_KEY].registry)
    dag_api.setup(
        app,
        dags=Dags(dispatcher.pool, operators=builtin_operators(), wake_mode=dispatcher.wake_mode),
        runs=DagRuns(dispatcher.pool, wake_mode=dispatcher.wake_mode),
    )
    alerts_api.setup(
        app,
        destinations=Destinations(
            dispatcher.pool,
            secret_store or alerts_api.NoSecretStore(),
            allow=alerts_api.allow_from_env(),
        ),
    )
    app.add_routes(
        [
            web.get("/healthz", healthz),
            web.get("/readyz", readyz),
            web.get("/metrics", metrics),
        ]
    )
    if extra_routes:
        app.add_routes(extra_routes)
    return app


__all__ = ["METRICS_KEY", "Metrics", "make_app"]
