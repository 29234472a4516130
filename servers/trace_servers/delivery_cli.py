"""``trace delivery ...`` and ``trace alerts ...`` commands (mounted by ``trace_servers.cli``).

trace delivery run [--batch N] [--poll-s S] [--metrics-port P] [--allow CIDR ...]
                   [--retry-schedule S,S,...] [--lease-s S] [--timeout-s S]
    the Delivery Service: lease due deliveries (SKIP LOCKED: run more processes to send more),
    send them as signed webhooks, record every attempt, until SIGTERM/SIGINT; woken by
    ``NOTIFY trace_delivery`` when deliveries become due, polling every ``--poll-s`` as the
    fallback (``trace_lite.delivery_wakeups``); ``/metrics`` on
    127.0.0.1:P (due, in flight, sent, failed, suppressed, disabled, oldest due age)
trace alerts ls --org ORG [--dataset alert_events] [--limit N]
    the newest alert events (the detectors' ``alert_events`` dataset) with their deliveries
    counted per state
trace alerts destination-add --org ORG --name NAME --url URL [--kind webhook|slack|pagerduty]
                             [--routing-key KEY]
    check the URL (SSRF: every address the host resolves to), create the signing secret in the
    secret store and print it once (``trace_lite.alert_destinations``, as the HTTP API does)
trace alerts destination-ls --org ORG          the org's destinations (never a secret)
trace alerts destination-rm --org ORG --name NAME
    delete a destination: its due deliveries become disabled, its secrets are removed
trace alerts deliveries --org ORG [--state STATE] [--limit N]     recent deliveries (JSON)
trace alerts show DELIVERY_ID                                       its attempts (JSON)
trace alerts retry DELIVERY_ID        a failed, disabled or suppressed delivery: due now
trace alerts disable|enable --org ORG --destination NAME [--reason TEXT]
    disable (its due deliveries become disabled) or enable a destination

``--allow`` admits networks the SSRF guard refuses (tests: the receiver on 127.0.0.1/32); so
does ``TRACE_DELIVERY_ALLOW`` (comma-separated). Secrets live in the Lite secret store
(``<home>/secrets/store``, ``trace_lite.secrets``). All commands talk to the state database
directly, like ``trace migrate``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import socket
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Gauge
from psycopg_pool import AsyncConnectionPool

from trace_core import errors, wire
from trace_core.alert_destinations import DestinationCreate
from trace_core.delivery import LeasePolicy, RetrySchedule, schedule_from
from trace_core.ssrf import AllowList
from trace_lite.alert_destinations import Destinations
from trace_lite.alert_inputs import recent_alert_events
from trace_lite.config import LiteSettings
from trace_lite.delivery import KINDS, DeliveryStore
from trace_lite.delivery_service import FAULT_POINTS, DeliveryService
from trace_lite.delivery_wakeups import DeliveryWakeups
from trace_lite.embedded_pg import default_database_urls
from trace_lite.orgs import Orgs
from trace_lite.pg import open_pool
from trace_lite.secrets import FileSecretStore
from trace_lite.webhook_sender import WebhookSender, new_signing_secret
from trace_servers.metrics_http import serve_metrics
from trace_servers.signals import kill_hook, stop_event

log = logging.getLogger("trace.delivery")


def add_parsers(sub: Any) -> None:
    d = sub.add_parser("delivery", help="the Delivery Service: send alert deliveries")
    dsub = d.add_subparsers(dest="delivery_cmd", required=True)
    r = dsub.add_parser("run")
    r.add_argument("--batch", type=int, default=20)
    r.add_argument("--poll-s", type=float, default=1.0)
    r.add_argument("--metrics-port", type=int, default=0)
    r.add_argument("--allow", action="append", default=[], help="CIDR; repeatable")
    r.add_argument("--retry-schedule", help="comma-separated delays in seconds")
    r.add_argument("--lease-s", type=float, default=60.0)
    r.add_argument("--timeout-s", type=float, default=15.0)
    r.add_argument("--id", default="", help="this sender's name in delivery_attempts")
    # fault injection for the crash tests: SIGKILL this process at that point
    r.add_argument("--kill-at", choices=FAULT_POINTS, help=argparse.SUPPRESS)
    a = sub.add_parser("alerts", help="alert destinations and deliveries")
    asub = a.add_subparsers(dest="alerts_cmd", required=True)
    add = asub.add_parser("destination-add")
    add.add_argument("--org", required=True)
    add.add_argument("--name", required=True)
    add.add_argument("--url", required=True)
    add.add_argument("--kind", choices=KINDS, default="webhook")
    add.add_argument("--routing-key", help="PagerDuty integration key (pagerduty only)")
    add.add_argument("--allow", action="append", default=[], help="CIDR; repeatable")
    asub.add_parser("destination-ls").add_argument("--org", required=True)
    rm = asub.add_parser("destination-rm")
    rm.add_argument("--org", required=True)
    rm.add_argument("--name", required=True)
    events = asub.add_parser("ls")
    events.add_argument("--org", required=True)
    events.add_argument("--dataset", default="alert_events")
    events.add_argument("--limit", type=int, default=50)
    ls = asub.add_parser("deliveries")
    ls.add_argument("--org", required=True)
    ls.add_argument("--state")
    ls.add_argument("--limit", type=int, default=100)
    asub.add_parser("show").add_argument("delivery_id")
    asub.add_parser("retry").add_argument("delivery_id")
    for name in ("disable", "enable"):
        p = asub.add_parser(name)
        p.add_argument("--org", required=True)
        p.add_argument("--destination", required=True)
        p.add_argument("--reason", default="disabled by an operator")


def secret_store(settings: LiteSettings) -> FileSecretStore:
    return FileSecretStore(settings.home / "secrets" / "store")


def allow_list(cidrs: list[str]) -> AllowList:
    env = os.environ.get("TRACE_DELIVERY_ALLOW", "")
    return AllowList.of([*cidrs, *(c for c in env.split(",") if c.strip())])


# --- metrics ---------------------------------------------------------------------------------


class DeliveryMetrics:
    """The Delivery Service's gauges, refreshed from the database at each scrape."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.deliveries = Gauge(
            "trace_delivery_deliveries",
            "Alert deliveries by state (due, in_flight, sent, failed, suppressed, disabled)",
            ["state"],
            registry=self.registry,
        )
        self.oldest_due = Gauge(
            "trace_delivery_oldest_due_seconds",
            "How long the oldest due delivery has been waiting",
            registry=self.registry,
        )

    async def refresh(self, store: DeliveryStore) -> None:
        counts = await store.counts()
        for state, n in counts.by_state.items():
            self.deliveries.labels(state).set(n)
        self.oldest_due.set(counts.oldest_due_s)


async def _serve_metrics(store: DeliveryStore, port: int) -> web.AppRunner:
    metrics = DeliveryMetrics()
    return await serve_metrics(metrics.registry, lambda: metrics.refresh(store), port)


# --- run -------------------------------------------------------------------------------------


async def run(settings: LiteSettings, state_url: str, args: argparse.Namespace) -> None:
    stop = stop_event()
    schedule = (
        schedule_from([float(x) for x in args.retry_schedule.split(",")])
        if args.retry_schedule
        else RetrySchedule()
    )
    pool = await open_pool(state_url, min_size=1, max_size=4)
    store = DeliveryStore(
        pool, schedule=schedule, lease=LeasePolicy(lease_s=args.lease_s, timeout_s=args.timeout_s)
    )
    sender = WebhookSender(
        secret_store(settings), allow=allow_list(args.allow), timeout_s=args.timeout_s
    )

    service = DeliveryService(
        store,
        sender,
        sender_id=args.id or f"{socket.gethostname()}:{os.getpid()}",
        batch=args.batch,
        poll_s=args.poll_s,
        fault=kill_hook(args.kill_at),
        wakeups=await DeliveryWakeups(state_url).start(),
    )
    runner = await _serve_metrics(store, args.metrics_port) if args.metrics_port else None
    try:
        print(json.dumps({"delivery": "running", "pid": os.getpid()}), flush=True)
        await service.run(stop)
    finally:
        if runner is not None:
            await runner.cleanup()
        if service.wakeups is not None:
            await service.wakeups.close()
        await pool.close()


# --- alerts ----------------------------------------------------------------------------------


def data_url(settings: LiteSettings, state_url: str) -> str:
    """The data database's URL (``trace alerts ls`` reads the alert events there)."""
    if settings.database_url:
        return settings.data_database_url or settings.database_url
    if os.environ.get("TRACE_DATA_DATABASE_URL"):
        return os.environ["TRACE_DATA_DATABASE_URL"]
    return default_database_urls(settings.home / "pg")[1]


async def destinations(
    settings: LiteSettings, pool: AsyncConnectionPool, args: argparse.Namespace
) -> Any:
    """``trace alerts destination-add|ls|rm`` as the platform (``Destinations``)."""
    allow = allow_list(args.allow) if args.alerts_cmd == "destination-add" else AllowList()
    service = Destinations(pool, secret_store(settings), allow=allow)
    if args.alerts_cmd == "destination-ls":
        return [wire.unstructure(d) for d in await service.list(None, args.org)]
    if args.alerts_cmd == "destination-rm":
        disabled = await service.delete(None, args.org, args.name)
        return {"deleted": args.name, "deliveries_disabled": disabled}
    secret = new_signing_secret()
    req = DestinationCreate(
        name=args.name,
        url=args.url,
        kind=args.kind,
        signing_secret=secret,
        routing_key=args.routing_key,
    )
    dest, _ = await service.create(None, args.org, req)
    row = await service.store.destination(dest.destination_id)
    # the only time the secret is shown: the receiver verifies with it
    return {**row._asdict(), "signing_secret": secret}


async def alerts(
    settings: LiteSettings, pool: AsyncConnectionPool, args: argparse.Namespace, state_url: str
) -> Any:
    """``trace alerts ...``: the answer to print."""
    store = DeliveryStore(pool)
    cmd = args.alerts_cmd
    if cmd == "show":
        return [
            {**a._asdict(), "started_at": str(a.started_at), "finished_at": str(a.finished_at)}
            for a in await store.attempts(args.delivery_id)
        ]
    if cmd == "retry":
        return {"delivery_id": args.delivery_id, "state": await store.retry(args.delivery_id)}
    if cmd == "ls":
        data_pool = await open_pool(data_url(settings, state_url), min_size=1, max_size=2)
        try:
            return await recent_alert_events(
                pool, data_pool, args.org, dataset=args.dataset, limit=args.limit
            )
        finally:
            await data_pool.close()
    if cmd in ("destination-add", "destination-ls", "destination-rm"):
        return await destinations(settings, pool, args)
    org_id = await Orgs(pool).org_id(args.org)
    if cmd == "deliveries":
        rows = await store.deliveries(org_id, state=args.state, limit=args.limit)
        return [{k: v if isinstance(v, int | str | None) else str(v)
                 for k, v in r._asdict().items()} for r in rows]  # fmt: skip
    dest = await store.destination_by_name(org_id, args.destination)
    enabled = cmd == "enable"
    n = await store.set_enabled(
        dest.destination_id, enabled=enabled, reason=None if enabled else args.reason
    )
    return {"destination": args.destination, "enabled": enabled, "deliveries_disabled": n}


def cmd_delivery(settings: LiteSettings, args: argparse.Namespace, state_url: str) -> int:
    from trace_servers import logs

    logs.setup("delivery")
    try:
        asyncio.run(run(settings, state_url, args))
    except errors.TraceError as exc:
        raise SystemExit(f"trace delivery: {exc.code}: {exc.message}") from None
    return 0


def cmd_alerts(settings: LiteSettings, args: argparse.Namespace, state_url: str) -> int:
    async def go() -> Any:
        pool = await open_pool(state_url, min_size=1, max_size=2)
        try:
            return await alerts(settings, pool, args, state_url)
        finally:
            await pool.close()

    try:
        print(json.dumps(asyncio.run(go()), indent=2, default=str))
    except errors.TraceError as exc:
        print(json.dumps(exc.to_dict()))
        return 1
    return 0


__all__ = ["DeliveryMetrics", "add_parsers", "cmd_alerts", "cmd_delivery", "run"]
