"""Alert routing benchmark: alert events -> ``alert_deliveries`` rows per second, through the
path ``alert_route`` takes, next to a raw INSERT of the same rows.

    .venv/bin/python -m bench.alerts [--events 20000] [--batch 200] [--runs 5]

Each run gets two fresh migrated state databases (one org, two destinations ``ops`` and
``audit``, one running task) and, alternating which goes first, times:

* **trace**: for each batch of ``--batch`` events (what ``alert_route`` receives per committed
  ``alert_events`` batch), ``plan_deliveries`` over one route to both destinations, then
  ``DeliveryStore.record_planned``: one transaction that checks the attempt is the task's
  running one, resolves the destinations by name, decides ``due``/``suppressed`` at the
  database's clock, inserts each delivery ``ON CONFLICT (delivery_key) DO NOTHING`` and reads
  every state back;
* **raw**: the same delivery rows (keys computed beforehand), one plain
  ``INSERT INTO alert_deliveries`` per row with ``executemany``, one transaction per batch
  (no fence, no lookups, no conflict handling, no read-back): the floor.

Then the sending side (``--send N`` deliveries, 0 to skip), once per run with 1 and 2
``trace delivery run`` processes (started first and left idle until they poll) against a local
receiver in this process that answers 200 at once: the deliveries are routed as above, and the
clock runs from the first routing transaction to the last webhook received. It reports
deliveries/s and the p50 / p95 latency from a delivery's creation (its routing commit, the
database's clock) to its receipt (this machine's clock).

It prints medians over ``--runs`` (and the median of the per-run ratios to raw). Not a timed
test: numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import web
from psycopg.types.json import Jsonb

from bench import cli_procs, library
from bench.common import BenchPostgres
from trace_core.alert_rules import AlertEvent, Planned, Route, alert_key, plan_deliveries
from trace_core.delivery import delivery_key
from trace_lite.delivery import DeliveryStore
from trace_lite.dispatcher import open_pool
from trace_lite.orgs import Orgs
from trace_lite.secrets import FileSecretStore
from trace_lite.webhook_sender import new_signing_secret

ORG = "bench"
ROUTE = Route("pages", ("ops", "audit"))
RAW_INSERT = (
    "INSERT INTO alert_deliveries (delivery_id, org_id, destination_id, delivery_key, alert_key,"
    " route, event_time, payload, state) VALUES (%(delivery_id)s, %(org_id)s,"
    " %(destination_id)s, %(delivery_key)s, %(alert_key)s, %(route)s, %(event_time)s,"
    " %(payload)s, 'due')"
)


def events(n: int) -> list[AlertEvent]:
    now = datetime.now(UTC)
    return [
        AlertEvent(
            alert_key=alert_key("bench", [i]),
            event_time=now,
            summary=f"bench: transfer {i}",
            severity="error",
            details={"i": i},
            detector="bench",
        )
        for i in range(n)
    ]


async def setup(
    url: str, hook: str | None = None, secrets: FileSecretStore | None = None
) -> tuple[Any, DeliveryStore, str, int, dict[str, str], str]:
    """A pool, the store, a running task (id, attempt), destination ids by name, the org id.
    With ``hook``, both destinations send there, signed with secrets put in ``secrets``."""
    pool = await open_pool(url, min_size=1, max_size=4)
    org_id = await Orgs(pool).org_id(ORG, create=True)
    store = DeliveryStore(pool)
    ids = {}
    for name in ROUTE.destinations:
        secret_name = f"trace/org/{org_id}/webhooks.{name}"
        if secrets is not None:
            await secrets.put(secret_name, new_signing_secret().encode())
        row = await store.add_destination(
            org_id=org_id,
            name=name,
            kind="webhook",
            url=hook or f"https://{name}.example.com/hook",
            secret_name=secret_name,
        )
        ids[name] = row.destination_id
    claim = await library.running_task(library.dispatcher(pool), "alert_route", ORG)
    return pool, store, claim.task_id, claim.attempt, ids, org_id


async def run_trace(url: str, evs: list[AlertEvent], batch: int) -> float:
    pool, store, task_id, attempt, _, _ = await setup(url)
    try:
        started = time.perf_counter()
        for i in range(0, len(evs), batch):
            planned = plan_deliveries(evs[i : i + batch], [ROUTE])
            await store.record_planned(task_id, attempt, planned)
        return time.perf_counter() - started
    finally:
        await pool.close()


def raw_rows(planned: list[Planned], ids: dict[str, str], org_id: str) -> list[dict[str, Any]]:
    return [
        {
            "delivery_id": str(uuid.uuid4()),
            "org_id": org_id,
            "destination_id": ids[p.destination],
            "delivery_key": delivery_key(p.alert_key, p.route, ids[p.destination]),
            "alert_key": p.alert_key,
            "route": p.route,
            "event_time": p.event_time,
            "payload": Jsonb(dict(p.payload)),
        }
        for p in planned
    ]


async def run_raw(url: str, evs: list[AlertEvent], batch: int) -> float:
    pool, _, _, _, ids, org_id = await setup(url)
    try:
        batches = [
            raw_rows(plan_deliveries(evs[i : i + batch], [ROUTE]), ids, org_id)
            for i in range(0, len(evs), batch)
        ]
        started = time.perf_counter()
        for rows in batches:
            async with pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
                await cur.executemany(RAW_INSERT, rows)
        return time.perf_counter() - started
    finally:
        await pool.close()


class Receiver:
    """Answers every webhook 200 at once and notes when each ``webhook-id`` arrived."""

    def __init__(self) -> None:
        self.seen: dict[str, float] = {}
        self.expected = 0
        self.all_in = asyncio.Event()
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def _hook(self, request: web.Request) -> web.Response:
        await request.read()
        self.seen.setdefault(request.headers.get("webhook-id", ""), time.time())
        if len(self.seen) >= self.expected:
            self.all_in.set()
        return web.Response(status=200)

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/hook", self._hook)
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


def start_senders(home: Path, url: str, n: int) -> list[subprocess.Popen[bytes]]:
    """``n`` ``trace delivery run`` processes, returned once each is running."""
    argv = ["delivery", "run", "--allow", "127.0.0.1/32", "--poll-s", "0.05", "--batch", "50"]
    return cli_procs.start_running(cli_procs.cli_env(home, url), argv, n, "delivery")


async def run_send(url: str, evs: list[AlertEvent], batch: int, senders: int) -> dict[str, float]:
    """Route ``evs`` while ``senders`` Delivery Service processes send them to a local
    receiver; seconds until the last one arrived, and the creation-to-receipt p50 / p95."""
    receiver = await Receiver().start()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        secrets = FileSecretStore(home / ".trace" / "secrets" / "store")  # LiteSettings.home
        hook = f"http://127.0.0.1:{receiver.port}/hook"
        pool, store, task_id, attempt, _, _ = await setup(url, hook, secrets)
        procs = start_senders(home, url, senders)
        try:
            receiver.expected = len(evs) * len(ROUTE.destinations)
            started = time.perf_counter()
            for i in range(0, len(evs), batch):
                await store.record_planned(
                    task_id, attempt, plan_deliveries(evs[i : i + batch], [ROUTE])
                )
            async with asyncio.timeout(600):  # a sender failing would never finish
                await receiver.all_in.wait()
            seconds = time.perf_counter() - started
            async with pool.connection() as conn:
                cur = await conn.execute(
                    "SELECT delivery_key, extract(epoch FROM created_at)::float8 "
                    "FROM alert_deliveries"
                )
                created = {f"msg_{k[:32]}": float(t) for k, t in await cur.fetchall()}
        finally:
            cli_procs.stop(procs)
            await pool.close()
            await receiver.stop()
    latencies = sorted(at - created[i] for i, at in receiver.seen.items() if i in created)
    return {
        "seconds": seconds,
        "p50": statistics.median(latencies),
        "p95": latencies[int(0.95 * (len(latencies) - 1))],
    }


async def main_async(n: int, batch: int, runs: int, send: int) -> None:
    pg = BenchPostgres().start()
    try:
        evs = events(n)
        deliveries = n * len(ROUTE.destinations)
        results: list[dict[str, float]] = []
        for i in range(runs):
            out: dict[str, float] = {}
            order = ("trace", "raw") if i % 2 == 0 else ("raw", "trace")
            for name in order:
                _, url = pg.fresh(trace_schema=True)
                run = run_trace if name == "trace" else run_raw
                out[name] = await run(url, evs, batch)
            results.append(out)
            print(f"run {i + 1}/{runs}: trace {out['trace']:.2f} s, raw {out['raw']:.2f} s")
        med = {k: statistics.median(r[k] for r in results) for k in ("trace", "raw")}
        ratio = statistics.median(r["raw"] / r["trace"] for r in results)
        print(
            f"alert routing: {n:,} events x {len(ROUTE.destinations)} destinations = "
            f"{deliveries:,} deliveries, batches of {batch} events, medians of {runs} runs"
        )
        print(f"{'scenario':<48}{'seconds':>9}{'deliveries/s':>14}{'vs raw':>8}")
        print(
            f"{'alert_route: plan + record_planned':<48}{med['trace']:>9.2f}"
            f"{deliveries / med['trace']:>14,.0f}{ratio:>8.0%}"
        )
        print(f"{'raw INSERT (executemany, no checks)':<48}{med['raw']:>9.2f}"
              f"{deliveries / med['raw']:>14,.0f}{1:>8.0%}")  # fmt: skip
        if send:
            await sending(pg, send, batch, runs)
        print(f"machine: {os.cpu_count()} cores; server: {pg.server_settings()}")
    finally:
        pg.stop()


async def sending(pg: BenchPostgres, send: int, batch: int, runs: int) -> None:
    evs = events(send // len(ROUTE.destinations))
    total = len(evs) * len(ROUTE.destinations)
    results: dict[int, list[dict[str, float]]] = {1: [], 2: []}
    for i in range(runs):
        for senders in (1, 2) if i % 2 == 0 else (2, 1):
            _, url = pg.fresh(trace_schema=True)
            out = await run_send(url, evs, batch, senders)
            results[senders].append(out)
            print(
                f"send run {i + 1}/{runs}, {senders} sender(s): {out['seconds']:.2f} s, "
                f"p50 {out['p50'] * 1000:.0f} ms, p95 {out['p95'] * 1000:.0f} ms"
            )
    print(f"delivery: {total:,} deliveries to a local receiver answering at once, medians")
    print(f"{'scenario':<48}{'seconds':>9}{'deliveries/s':>14}{'p50 ms':>8}{'p95 ms':>8}")
    for senders, rs in results.items():
        sec = statistics.median(r["seconds"] for r in rs)
        p50 = statistics.median(r["p50"] for r in rs) * 1000
        p95 = statistics.median(r["p95"] for r in rs) * 1000
        label = f"trace delivery run x{senders} (routing meanwhile)"
        print(f"{label:<48}{sec:>9.2f}{total / sec:>14,.0f}{p50:>8.0f}{p95:>8.0f}")


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--events", type=int, default=20_000)
    p.add_argument("--batch", type=int, default=200)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--send", type=int, default=2000, help="deliveries to send (0: skip)")
    args = p.parse_args()
    asyncio.run(main_async(args.events, args.batch, args.runs, args.send))


if __name__ == "__main__":
    main()
