"""``trace sink ...`` and ``trace dlq ...`` commands (mounted by ``trace_servers.cli``).

trace sink run --org ORG [--dataset NAME ...] [--metrics-port P]
    run the sink of each named buffered dataset (default: every buffered dataset of the org)
    and the buffer forwarder for them, until SIGTERM/SIGINT; ``/metrics`` on 127.0.0.1:P
trace sink status --org ORG [--dataset NAME ...]
    per dataset: queue depth, in flight, dead letters, oldest message age (lag), announcements
    not forwarded yet (JSON)
trace dlq ls                                    queues with dead letters, and how many
trace dlq show|replay|purge [--org ORG --dataset NAME | --queue NAME] [--max N]
    a queue's dead letters with their reasons / back to the queue / deleted (``purge`` needs
    ``--yes``); without ``--dataset``/``--queue``: the task queue

All of them talk to the state database directly (an operator's commands, like ``trace
migrate``); the sink also to the data database and the object store.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import attrs
from aiohttp import web
from prometheus_client import CollectorRegistry, Gauge
from psycopg_pool import AsyncConnectionPool

from trace_core import errors
from trace_core.ports import Queue, ReceivedMessage
from trace_lite.buffer_forwarder import BufferForwarder, queue_name, topic
from trace_lite.buffer_queues import QueueProvisioner, buffer_queue
from trace_lite.config import LiteSettings
from trace_lite.pg import fetch_as, open_pool, transaction
from trace_lite.pg_queue import PgQueue
from trace_lite.sink import FAULT_POINTS, Q, Sink, load_dataset, queue_status
from trace_sdk.aio import run_every
from trace_servers.metrics_http import serve_metrics
from trace_servers.signals import kill_hook, stop_event

log = logging.getLogger("trace.sink")


def add_parsers(sub: Any) -> None:
    s = sub.add_parser("sink", help="buffered Postgres datasets: run the sink, show its status")
    ssub = s.add_subparsers(dest="sink_cmd", required=True)
    for name in ("run", "status"):
        p = ssub.add_parser(name)
        p.add_argument("--org", required=True)
        p.add_argument("--dataset", action="append", default=[], help="repeatable")
        if name == "run":
            p.add_argument("--metrics-port", type=int, default=0)
            p.add_argument("--visibility-s", type=float, default=60.0)
            # fault injection for the crash tests: SIGKILL this process at that point
            p.add_argument("--kill-at", choices=FAULT_POINTS, help=argparse.SUPPRESS)
    d = sub.add_parser("dlq", help="dead-letter queues: list, show, replay, purge")
    dsub = d.add_subparsers(dest="dlq_cmd", required=True)
    dsub.add_parser("ls")
    for name in ("show", "replay", "purge"):
        p = dsub.add_parser(name)
        p.add_argument("--org")
        p.add_argument("--dataset")
        p.add_argument("--queue", help="a queue by name (default: the task queue)")
        p.add_argument("--max", type=int, default=100)
        if name == "purge":
            p.add_argument("--yes", action="store_true", help="really delete them")


# --- sink ------------------------------------------------------------------------------------


async def _datasets(pool: AsyncConnectionPool, org: str, names: Sequence[str]) -> list[str]:
    if names:
        return list(names)
    async with transaction(pool) as cur:
        rows = await fetch_as(cur, _NameRow, Q["buffered_datasets"], {"org": org})
    return [r.name for r in rows]


@attrs.frozen
class _NameRow:
    name: str


@attrs.frozen
class _PendingRow:
    pending: int


@attrs.frozen
class _DeadRow:
    queue: str
    dead: int


@attrs.frozen
class _PurgedRow:
    purged: int


async def queue_backlog(pool: AsyncConnectionPool, queue: Queue) -> dict[str, Any]:
    """``depth``, ``in_flight``, ``dead`` and ``oldest_age_s`` of a queue: from the queue
    table for the Postgres queue; from SQS's attributes otherwise, where ``oldest_age_s`` is
    ``None`` (SQS has it in CloudWatch only). Raises ``NotFound``, ``Unavailable``."""
    if isinstance(queue, PgQueue):
        st = await queue_status(pool, queue.name)
        return {k: v for k, v in attrs.asdict(st).items() if k != "queue"}
    stats = await queue.stats()  # type: ignore[attr-defined]
    return {**attrs.asdict(stats), "oldest_age_s": None}


async def status(
    pool: AsyncConnectionPool,
    org: str,
    names: Sequence[str],
    queue_for: Callable[[str], Queue] | None = None,
) -> list[dict[str, Any]]:
    """Per dataset: its queue (``queue_for``, the Postgres queue by default), whether it was
    created on the backend, its backlog and the announcements not forwarded yet."""
    out = []
    for name in await _datasets(pool, org, names):
        ds = await load_dataset(pool, org, name)
        row = await buffer_queue(pool, ds.dataset_uuid)
        qname = queue_name(ds.dataset_uuid)
        backlog: dict[str, Any] = dict.fromkeys(("depth", "in_flight", "dead", "oldest_age_s"))
        if row is not None and row.provisioned:
            queue = PgQueue(pool, qname) if queue_for is None else queue_for(qname)
            backlog = await queue_backlog(pool, queue)
        async with transaction(pool) as cur:
            (p,) = await fetch_as(
                cur, _PendingRow, Q["pending_announcements"], {"topic": topic(name)}
            )
        out.append(
            {
                "dataset": name,
                "dataset_uuid": ds.dataset_uuid,
                "queue": qname,
                "queue_created": row is not None and row.provisioned,
                **backlog,
                "not_forwarded": p.pending,
            }
        )
    return out


class SinkMetrics:
    """The sink process's Prometheus gauges, refreshed from the database at each scrape."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = ["dataset"]
        self.depth = Gauge(
            "trace_sink_queue_depth",
            "Buffer queue messages not done",
            labels,
            registry=self.registry,
        )
        self.dead = Gauge(
            "trace_sink_dead_letters", "Buffer batches in the DLQ", labels, registry=self.registry
        )
        self.lag = Gauge(
            "trace_sink_lag_seconds",
            "Age of the oldest buffer batch not stored yet",
            labels,
            registry=self.registry,
        )
        self.pending = Gauge(
            "trace_sink_not_forwarded",
            "Buffer announcements not on the dataset queue yet",
            labels,
            registry=self.registry,
        )
        self.stored = Gauge(
            "trace_sink_batches",
            "Batches handled by this process",
            ["dataset", "outcome"],
            registry=self.registry,
        )
        self.rows = Gauge(
            "trace_sink_rows_inserted", "Rows this process inserted", labels, registry=self.registry
        )

    async def refresh(
        self,
        pool: AsyncConnectionPool,
        org: str,
        sinks: Sequence[Sink],
        queue_for: Callable[[str], Queue] | None = None,
    ) -> None:
        for s in await status(pool, org, [x.dataset for x in sinks], queue_for):
            for gauge, key in (
                (self.depth, "depth"),
                (self.dead, "dead"),
                (self.lag, "oldest_age_s"),
                (self.pending, "not_forwarded"),
            ):
                if s[key] is not None:
                    gauge.labels(s["dataset"]).set(s[key])
        for x in sinks:
            self.stored.labels(x.dataset, "stored").set(x.stats["batches"])
            self.stored.labels(x.dataset, "dead").set(x.stats["dead"])
            self.rows.labels(x.dataset).set(x.stats["inserted"])


async def run(
    settings: LiteSettings,
    state_url: str,
    data_url: str,
    org: str,
    names: Sequence[str],
    *,
    metrics_port: int = 0,
    visibility_s: float = 60.0,
    kill_at: str | None = None,
    refresh_s: float = 5.0,
    stop: asyncio.Event | None = None,
) -> None:
    """Run the sinks of ``names``, their forwarder and the queue provisioning pass until
    ``stop`` is set (SIGTERM/SIGINT when not given). With no ``names``: every buffered dataset
    of ``org``. Datasets are looked for again every ``refresh_s`` seconds, so one deployed
    later, or whose queue was not created yet, is served once it can be."""
    from trace_servers.profiles import buffer_queue_creator, sink_parts

    if stop is None:
        stop = stop_event()
    state = await open_pool(state_url, min_size=1, max_size=6)
    data = await open_pool(data_url, min_size=1, max_size=4)
    parts = await sink_parts(settings, state)
    provisioner = QueueProvisioner(state, buffer_queue_creator())

    def queue_for(dataset_uuid: str) -> Queue:
        return parts.queue_for(queue_name(dataset_uuid))

    runner: web.AppRunner | None = None
    sinks: list[Sink] = []
    forwarder = BufferForwarder(state, queue_for, topics=[])
    tasks: list[asyncio.Task[None]] = []

    def consumer(sink: Sink) -> Callable[[], Awaitable[int]]:
        return lambda: sink.process_once(max_messages=10, wait_s=1.0)

    async def add_new_datasets() -> None:
        """Start a consumer (and forward the topic) of each dataset not served yet."""
        served = {x.dataset for x in sinks}
        for name in await _datasets(state, org, names):
            if name in served:
                continue
            try:
                ds = await load_dataset(state, org, name)
                queue = queue_for(ds.dataset_uuid)
            except errors.TraceError as exc:  # not deployed, or its queue not created yet
                log.warning("dataset not served yet", extra={"dataset": name, "why": str(exc)})
                continue
            sink = Sink(
                state_pool=state,
                data_pool=data,
                object_store=parts.object_store,
                queue=queue,
                org=org,
                dataset=name,
                visibility_timeout_s=visibility_s,
                fault=kill_hook(kill_at),
            )
            sinks.append(sink)
            forwarder.topics.append(topic(name))
            loop_ = run_every(stop, 0.0, consumer(sink), name=f"sink {name}", logger=log)
            tasks.append(asyncio.create_task(loop_))
            print(json.dumps({"sink": "serving", "org": org, "dataset": name}), flush=True)

    try:
        await provisioner.provision_once()  # queues of deploys no Dispatcher provisioned yet
        await add_new_datasets()
        if metrics_port:
            runner = await _serve_metrics(state, org, sinks, metrics_port, parts.queue_for)
        print(json.dumps({"sink": "running", "org": org, "datasets": names or "all"}), flush=True)
        loops = [
            forwarder.run(stop, every_s=0.2),
            run_every(stop, 1.0, provisioner.provision_once, name="buffer queues", logger=log),
            # datasets deployed (or whose queues were created) after the start
            run_every(stop, refresh_s, add_new_datasets, name="sink datasets", logger=log),
        ]
        await asyncio.gather(*loops)
        await asyncio.gather(*tasks)
    finally:
        if runner is not None:
            await runner.cleanup()
        await parts.close()
        await state.close()
        await data.close()


async def provision_queues(pool: AsyncConnectionPool, stop: asyncio.Event) -> None:
    """Create the buffer queues deploys recorded (``trace_lite.buffer_queues``) on this
    profile's backend until ``stop`` is set: the Dispatcher process runs it."""
    from trace_servers.profiles import buffer_queue_creator

    provisioner = QueueProvisioner(pool, buffer_queue_creator())
    await run_every(stop, 0.5, provisioner.provision_once, name="buffer queues", logger=log)


async def _serve_metrics(
    pool: AsyncConnectionPool,
    org: str,
    sinks: Sequence[Sink],
    port: int,
    queue_for: Callable[[str], Queue],
) -> web.AppRunner:
    metrics = SinkMetrics()
    return await serve_metrics(
        metrics.registry, lambda: metrics.refresh(pool, org, sinks, queue_for), port
    )


# --- dlq -------------------------------------------------------------------------------------


async def _target_queue(pool: AsyncConnectionPool, parts: Any, args: argparse.Namespace) -> Queue:
    if args.queue:
        return parts.queue_for(str(args.queue))  # type: ignore[no-any-return]
    if args.dataset:
        if not args.org:
            raise SystemExit("--dataset needs --org")
        ds = await load_dataset(pool, args.org, args.dataset)
        return parts.queue_for(queue_name(ds.dataset_uuid))  # type: ignore[no-any-return]
    return parts.task_queue()  # type: ignore[no-any-return]


async def _dead_counts(pool: AsyncConnectionPool, parts: Any) -> list[dict[str, Any]]:
    """Queues with dead letters: one query on the Postgres queue; else every buffer queue
    created and the task queue, asked one by one."""
    queues: list[Queue] = [parts.task_queue()]
    if isinstance(queues[0], PgQueue):
        async with transaction(pool) as cur:
            rows = await fetch_as(cur, _DeadRow, Q["dead_counts"], {})
        return [attrs.asdict(r) for r in rows]
    async with transaction(pool) as cur:
        names = await fetch_as(cur, _NameRow, Q["buffer_queue_names"], {})
    queues += [parts.queue_for(r.name) for r in names]
    out = []
    for queue in queues:
        dead = (await queue_backlog(pool, queue))["dead"]
        if dead:
            out.append({"queue": queue.name, "dead": dead})
    return sorted(out, key=lambda r: str(r["queue"]))


async def dlq(settings: LiteSettings, state_url: str, args: argparse.Namespace) -> Any:
    """``trace dlq ls|show|replay|purge`` on the profile's queues (the Postgres queue, or SQS
    with ``TRACE_PROFILE=aws``): the answer to print."""
    from trace_servers.profiles import sink_parts

    pool = await open_pool(state_url, min_size=1, max_size=2)
    parts = await sink_parts(settings, pool)
    try:
        if args.dlq_cmd == "ls":
            return await _dead_counts(pool, parts)
        queue = await _target_queue(pool, parts, args)
        if args.dlq_cmd == "show":
            letters: list[ReceivedMessage] = []
            while len(letters) < args.max:
                got = await queue.dead_letters(max_messages=min(10, args.max - len(letters)))
                fresh = [m for m in got if m.message_id not in {x.message_id for x in letters}]
                letters += fresh
                if len(got) < 10 or not fresh:
                    break
            return {
                "queue": queue.name,
                "dead_letters": [
                    {
                        "id": m.message_id,
                        "receive_count": m.receive_count,
                        "reason": m.dead_letter_reason,
                        "body": m.body.decode("utf-8", "replace")[:2000],
                    }
                    for m in letters
                ],
            }
        if args.dlq_cmd == "replay":
            return {"queue": queue.name, "replayed": await queue.redrive(max_messages=args.max)}
        if not args.yes:
            raise SystemExit("purge deletes the dead letters for good: add --yes")
        if isinstance(queue, PgQueue):
            async with transaction(pool) as cur:
                (r,) = await fetch_as(cur, _PurgedRow, Q["purge_dead"], {"queue": queue.name})
            return {"queue": queue.name, "purged": r.purged}
        return {"queue": queue.name, "purged": await queue.purge_dead_letters()}  # type: ignore[attr-defined]
    finally:
        await parts.close()
        await pool.close()


def cmd_sink(settings: LiteSettings, args: argparse.Namespace, urls: tuple[str, str]) -> int:
    try:
        return _cmd_sink(settings, args, urls)
    except errors.TraceError as exc:
        raise SystemExit(f"trace sink: {exc.code}: {exc.message}") from None


def _cmd_sink(settings: LiteSettings, args: argparse.Namespace, urls: tuple[str, str]) -> int:
    state_url, data_url = urls
    if args.sink_cmd == "status":

        async def go() -> list[dict[str, Any]]:
            from trace_servers.profiles import sink_parts

            pool = await open_pool(state_url, min_size=1, max_size=2)
            parts = await sink_parts(settings, pool)
            try:
                return await status(pool, args.org, args.dataset, parts.queue_for)
            finally:
                await parts.close()
                await pool.close()

        print(json.dumps(asyncio.run(go()), indent=2))
        return 0
    from trace_servers import logs

    logs.setup("sink")
    asyncio.run(
        run(
            settings,
            state_url,
            data_url,
            args.org,
            args.dataset,
            metrics_port=args.metrics_port,
            visibility_s=args.visibility_s,
            kill_at=args.kill_at,
        )
    )
    return 0


def cmd_dlq(settings: LiteSettings, args: argparse.Namespace, state_url: str) -> int:
    try:
        print(json.dumps(asyncio.run(dlq(settings, state_url, args)), indent=2))
    except errors.TraceError as exc:
        raise SystemExit(f"trace dlq: {exc.code}: {exc.message}") from None
    return 0


__all__ = [
    "SinkMetrics",
    "add_parsers",
    "cmd_dlq",
    "cmd_sink",
    "dlq",
    "provision_queues",
    "queue_backlog",
    "run",
    "status",
]
