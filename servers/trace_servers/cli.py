"""``trace`` -- the command line: run Lite, migrate, run servers and workers, inspect tasks.

trace migrate                 apply state and data migrations (safe to run twice)
trace dispatcher              run the Dispatcher (HTTP + reaper + outbox publisher)
trace worker                  run a worker wrapper with the built-in operators
trace up                      run Lite: embedded Postgres, a Dispatcher and N workers
trace demo                    run Lite, a local chain and the Monad example DAG (--synthetic: tasks)
trace task create|get|cancel  admin calls against a running Dispatcher
trace keys init|rotate|revoke manage the Ed25519 signing keys (current + next; revoke KID)
trace pg start|stop|url       manage the embedded Postgres cluster
trace dag validate|diff|schema  DAG files, offline (trace_servers.dag_cli)
trace sink run|status         buffered datasets' sinks (trace_servers.sink_cli)
trace delivery run | alerts   the Delivery Service, alert deliveries (trace_servers.delivery_cli)
trace dlq ls|show|replay|purge  dead-letter queues of the task queue and dataset queues
trace query "SQL" --org ORG   one read-only SELECT over your datasets (trace_servers.query_cli)
trace udf init|build|test|deploy|runner  UDF bundles and the Lite runner (trace_servers.udf_cli)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trace_lite.config import LiteSettings
from trace_servers.lite_processes import LiteProcesses
from trace_servers.signals import STOP_SIGNALS, stop_event

log = logging.getLogger("trace.cli")


def _urls(settings: LiteSettings) -> tuple[str, str]:
    if settings.database_url:
        return settings.database_url, settings.data_database_url or settings.database_url
    from trace_lite.embedded_pg import default_database_urls

    return default_database_urls(settings.home / "pg")


# --- migrate ---------------------------------------------------------------------------------


def cmd_migrate(settings: LiteSettings, _args: argparse.Namespace) -> int:
    from trace_lite.migrate import migrate

    state_url, data_url = _urls(settings)
    applied = migrate(state_url, data_url)
    print(json.dumps({"applied": applied}))
    return 0


# --- dispatcher ------------------------------------------------------------------------------


async def _run_dispatcher(settings: LiteSettings, state_url: str) -> None:
    from aiohttp import web

    from trace_lite.dispatcher import Dispatcher, open_pool
    from trace_servers import profiles
    from trace_servers.app import make_app

    pool = await open_pool(state_url, min_size=4, max_size=16)
    claim_pool = await open_pool(state_url, min_size=1, max_size=6, role="claim")
    parts = await profiles.dispatcher_parts(settings, pool)
    queue = parts.queue
    dispatcher = Dispatcher(
        pool,
        signer=parts.signer,
        queue=queue,
        object_store=parts.object_store,
        lease=settings.lease,
        retry=settings.retry,
        claim_pool=claim_pool,
    )
    if parts.launcher_factory is not None:
        dispatcher.launcher = parts.launcher_factory(dispatcher)
    from trace_lite.datasets import Datasets
    from trace_lite.secrets import FileSecretStore
    from trace_lite.users import UserAuthenticator

    app = make_app(
        dispatcher,
        platform_token=settings.platform_token,
        extra_routes=parts.extra_routes,
        credential_minter=parts.credential_minter,
        user_auth=UserAuthenticator.from_env(settings.key_dir),
        data_url=_urls(settings)[1],
        secret_store=FileSecretStore(settings.home / "secrets" / "store"),
    )
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(
        runner, settings.dispatcher_host, settings.dispatcher_port, reuse_address=True
    )
    await site.start()
    stop = stop_event()
    log.info("dispatcher listening", extra={"url": settings.dispatcher_url})
    # dataset promotion + staging sweep (grace: TRACE_STAGING_GRACE_S, default 1 h)
    sweep = asyncio.create_task(
        Datasets(pool, object_store=parts.object_store).run_background(
            stop, grace_s=float(os.environ.get("TRACE_STAGING_GRACE_S", "3600"))
        )
    )
    # DAG schedules and event fan-out (trace_lite.dag_runs)
    from trace_lite.dag_runs import DagRuns

    dag_runs = asyncio.create_task(DagRuns(pool, wake_mode=dispatcher.wake_mode).run(stop))
    # buffer queues of deployed buffered datasets (trace_lite.buffer_queues)
    from trace_servers.sink_cli import provision_queues

    buffer_queues = asyncio.create_task(provision_queues(pool, stop))
    try:
        await dispatcher.run_background(stop)
    finally:
        await buffer_queues
        await dag_runs
        await sweep
        await runner.cleanup()
        await parts.close()
        await claim_pool.close()
        await pool.close()
        log.info("dispatcher stopped")


def cmd_dispatcher(settings: LiteSettings, _args: argparse.Namespace) -> int:
    from trace_servers import logs

    logs.setup("dispatcher")
    state_url, _ = _urls(settings)
    asyncio.run(_run_dispatcher(settings, state_url))
    return 0


# --- worker ----------------------------------------------------------------------------------


async def _run_worker(settings: LiteSettings, state_url: str, concurrency: int) -> None:
    from trace_lite.secrets import FileSecretStore
    from trace_sdk import BUILTIN_OPERATORS, DispatcherClient, Worker, take_platform_token
    from trace_servers import profiles

    # the credential leaves the environment before any operator code runs (trace_sdk._process)
    platform_token = take_platform_token() or settings.platform_token
    parts = await profiles.worker_parts(settings, state_url)
    queue, store = parts.queue, parts.object_store
    client = DispatcherClient(settings.dispatcher_url, platform_token=platform_token)
    operators = dict(BUILTIN_OPERATORS)
    lite_pool = data_pool = None
    if profiles.profile() == "lite":  # operators over the state database (trace_lite.chain)
        from trace_lite.chain.operators import lite_operators
        from trace_lite.pg import open_pool

        lite_pool = await open_pool(state_url, min_size=1, max_size=4)
        operators |= lite_operators(lite_pool, store)
        from trace_lite.alert_operators import alert_operators  # and alerting (trace_sdk.alerts)

        data_pool = await open_pool(_urls(settings)[1], min_size=1, max_size=2)
        operators |= alert_operators(lite_pool, data_pool, store)
    worker = Worker(
        surface=client,
        queue=queue,
        operators=operators,
        store=store,
        concurrency=concurrency,
        grace_s=min(30.0, settings.lease_s),
        secrets=FileSecretStore(settings.home / "secrets" / "store"),  # pooled jobs' secret_env
    )
    stop = stop_event()
    log.info("worker started", extra={"worker_id": worker.worker_id})
    try:
        await worker.run(stop)
    finally:
        await client.close()
        await parts.close()
        if lite_pool is not None:
            await lite_pool.close()
        if data_pool is not None:
            await data_pool.close()
        log.info("worker stopped", extra={"stats": worker.stats})


def cmd_worker(settings: LiteSettings, args: argparse.Namespace) -> int:
    from trace_servers import logs

    logs.setup("worker")
    state_url, _ = _urls(settings)
    asyncio.run(_run_worker(settings, state_url, args.concurrency))
    return 0


# --- up / demo -------------------------------------------------------------------------------


def cmd_up(settings: LiteSettings, args: argparse.Namespace) -> int:
    from trace_lite.migrate import migrate

    state_url, data_url = _urls(settings)
    migrate(state_url, data_url)
    procs = LiteProcesses(
        settings, state_url, data_url, args.workers, args.concurrency, settings.home / "logs"
    )
    procs.start()
    print(
        f"Trace Lite running: dispatcher {settings.dispatcher_url}, {args.workers} workers; "
        f"logs in {settings.home / 'logs'}. Ctrl-C to stop."
    )
    stop = False

    def _stop(*_: Any) -> None:
        nonlocal stop
        stop = True

    for sig in STOP_SIGNALS:
        signal.signal(sig, _stop)
    try:
        while not stop:
            procs.check()  # a crashed worker or Dispatcher is restarted, not the end of Lite
            time.sleep(0.2)
    finally:
        procs.stop()
    return 0


def cmd_demo(settings: LiteSettings, args: argparse.Namespace) -> int:
    from trace_lite.migrate import migrate

    if not args.synthetic:  # Trace's main job on a live local chain (trace_servers.demo)
        from trace_servers import demo

        def children(state_url: str, data_url: str) -> LiteProcesses:
            log_dir = settings.home / "logs"
            return LiteProcesses(
                settings, state_url, data_url, args.workers, args.concurrency, log_dir
            )

        return demo.cmd_chain_demo(settings, args, children)

    from trace_servers import synthetic_demo

    print(f"Trace Lite demo: state in {settings.home}")
    state_url, data_url = _urls(settings)
    print(f"postgres: {state_url}")
    migrate(state_url, data_url)
    procs = LiteProcesses(
        settings, state_url, data_url, args.workers, args.concurrency, settings.home / "logs"
    )
    procs.start()
    try:
        code = asyncio.run(synthetic_demo.run_workload(settings, state_url, args))
    finally:
        print("stopping dispatcher and workers ...")
        procs.stop()
        if not settings.database_url and not args.keep_postgres:
            from trace_lite.embedded_pg import EmbeddedPostgres

            EmbeddedPostgres(settings.home / "pg").stop()
            print("embedded postgres stopped")
    return code


# --- admin -----------------------------------------------------------------------------------


async def _admin(settings: LiteSettings, args: argparse.Namespace) -> Any:
    from trace_sdk import DispatcherClient

    async with DispatcherClient(
        settings.dispatcher_url, platform_token=settings.platform_token, deadline_s=10
    ) as client:
        if args.task_cmd == "create":
            payload = json.loads(args.payload)
            return await client.create_tasks(
                [{"operator": args.operator, "org": args.org, "payload": payload}] * args.count
            )
        if args.task_cmd == "get":
            return await client.get_task(args.task_id)
        if args.task_cmd == "cancel":
            return await client.cancel(args.task_id)
        return await client.counts()


def cmd_task(settings: LiteSettings, args: argparse.Namespace) -> int:
    from trace_core import errors

    try:
        print(json.dumps(asyncio.run(_admin(settings, args)), indent=2, default=str))
    except errors.TraceError as exc:
        print(json.dumps(exc.to_dict()), file=sys.stderr)
        return 1
    return 0


def cmd_keys(settings: LiteSettings, args: argparse.Namespace) -> int:
    from trace_core import errors
    from trace_lite.local_signer import FileSigner

    signer = FileSigner.init(settings.key_dir)
    try:
        if args.keys_cmd == "rotate":
            signer.rotate(force=args.force)
        elif args.keys_cmd == "revoke":
            signer.revoke(args.kid)
    except errors.TraceError as exc:
        print(json.dumps(exc.to_dict()), file=sys.stderr)
        return 1
    keys = asyncio.run(signer.public_keys())
    print(json.dumps([{"kid": k.kid, "alg": k.algorithm} for k in keys], indent=2))
    return 0


def cmd_pg(settings: LiteSettings, args: argparse.Namespace) -> int:
    from trace_lite.embedded_pg import EmbeddedPostgres

    pg = EmbeddedPostgres(settings.home / "pg")
    if args.pg_cmd == "start":
        pg.start()
        print(pg.url())
    elif args.pg_cmd == "stop":
        pg.stop()
    else:
        print(pg.url())
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="trace", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("migrate", help="apply migrations")
    sub.add_parser("dispatcher", help="run the Dispatcher")
    w = sub.add_parser("worker", help="run a worker")
    w.add_argument("--concurrency", type=int, default=8)
    for name in ("up", "demo"):
        s = sub.add_parser(name, help=f"{name} Trace Lite")
        s.add_argument("--workers", type=int, default=2)
        s.add_argument("--concurrency", type=int, default=64)
        if name == "demo":
            s.add_argument("--tasks", type=int, default=2000)
            s.add_argument(
                "--fail-every", type=int, default=10, help="every Nth task fails its first attempt"
            )
            s.add_argument("--timeout", type=float, default=600)
            s.add_argument("--keep-postgres", action="store_true")
            # the chain demo (trace_servers.demo); --synthetic: the task workload above
            s.add_argument("--synthetic", action="store_true", help="the synthetic task workload")
            s.add_argument("--duration", type=float, default=60.0, help="seconds; 0: until ^C")
            s.add_argument("--history", type=int, default=600, help="blocks mined beforehand")
            s.add_argument("--drain", type=float, default=90.0, help="s to finish last ranges")
            s.add_argument("--rpc-url", help="use this node, not a new anvil (frozen at the end)")
            s.add_argument("--summary-json", type=Path, help="also write the summary here")
    t = sub.add_parser("task", help="admin calls")
    tsub = t.add_subparsers(dest="task_cmd", required=True)
    c = tsub.add_parser("create")
    c.add_argument("operator")
    c.add_argument("--payload", default="{}")
    c.add_argument("--org", default="default")
    c.add_argument("--count", type=int, default=1)
    for name in ("get", "cancel"):
        tsub.add_parser(name).add_argument("task_id")
    tsub.add_parser("counts")
    k = sub.add_parser("keys", help="signing keys")
    ksub = k.add_subparsers(dest="keys_cmd", required=True)
    ksub.add_parser("init")
    r = ksub.add_parser("rotate")
    r.add_argument("--force", action="store_true")
    rv = ksub.add_parser(
        "revoke", help="stop trusting a key in every process within seconds (a leaked key)"
    )
    rv.add_argument("kid")
    g = sub.add_parser("pg", help="embedded Postgres")
    g.add_argument("pg_cmd", choices=["start", "stop", "url"])
    from trace_servers import dag_cli, datasets_cli, delivery_cli, query_cli, sink_cli

    datasets_cli.add_parsers(sub)
    query_cli.add_parsers(sub)
    dag_cli.add_parsers(sub)
    sink_cli.add_parsers(sub)
    delivery_cli.add_parsers(sub)
    from trace_servers import udf_cli

    udf_cli.add_parsers(sub)
    return p


COMMANDS: dict[str, Callable[[LiteSettings, argparse.Namespace], int]] = {
    "migrate": cmd_migrate,
    "dispatcher": cmd_dispatcher,
    "worker": cmd_worker,
    "up": cmd_up,
    "demo": cmd_demo,
    "task": cmd_task,
    "keys": cmd_keys,
    "pg": cmd_pg,
    "users": lambda s, a: _datasets_cli("users", s, a),
    "datasets": lambda s, a: _datasets_cli("datasets", s, a),
    "dag": lambda s, a: _dag_cli(s, a),
    "query": lambda s, a: _query_cli(s, a),
    "sink": lambda s, a: _sink_cli("sink", s, a),
    "dlq": lambda s, a: _sink_cli("dlq", s, a),
    "delivery": lambda s, a: _delivery_cli(s, a),
    "alerts": lambda s, a: _delivery_cli(s, a),
    "udf": lambda s, a: _udf_cli(s, a),
}


def _udf_cli(settings: LiteSettings, args: argparse.Namespace) -> int:
    from trace_servers import udf_cli

    return udf_cli.cmd_udf(settings, args)


def _delivery_cli(settings: LiteSettings, args: argparse.Namespace) -> int:
    from trace_servers import delivery_cli

    if args.cmd == "delivery":
        return delivery_cli.cmd_delivery(settings, args, _urls(settings)[0])
    return delivery_cli.cmd_alerts(settings, args, _urls(settings)[0])


def _sink_cli(which: str, settings: LiteSettings, args: argparse.Namespace) -> int:
    from trace_servers import sink_cli

    if which == "sink":
        return sink_cli.cmd_sink(settings, args, _urls(settings))
    return sink_cli.cmd_dlq(settings, args, _urls(settings)[0])


def _datasets_cli(which: str, settings: LiteSettings, args: argparse.Namespace) -> int:
    from trace_servers import datasets_cli

    state_url = _urls(settings)[0] if which == "datasets" or args.users_cmd != "token" else ""
    if which == "users":
        return datasets_cli.cmd_users(settings, args, state_url)
    return datasets_cli.cmd_datasets(settings, args, state_url)


def _query_cli(settings: LiteSettings, args: argparse.Namespace) -> int:
    from trace_servers import query_cli

    return query_cli.cmd_query(settings, args)


def _dag_cli(settings: LiteSettings, args: argparse.Namespace) -> int:
    from trace_servers import dag_cli

    return dag_cli.cmd_dag(args, settings.dispatcher_url)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd not in ("dispatcher", "worker"):
        logging.basicConfig(level=logging.WARNING)
    settings = LiteSettings.from_env()
    return COMMANDS[args.cmd](settings, args)


__all__ = [
    "COMMANDS",
    "LiteProcesses",
    "build_parser",
    "cmd_demo",
    "cmd_dispatcher",
    "cmd_keys",
    "cmd_migrate",
    "cmd_pg",
    "cmd_task",
    "cmd_up",
    "cmd_worker",
    "main",
]

if __name__ == "__main__":
    sys.exit(main())
