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

It prints the median over ``--runs`` of seconds and deliveries/s of each and the median of the
per-run ratios trace/raw. Not a timed test: numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from psycopg.types.json import Jsonb

from bench.common import BenchPostgres
from trace_core import wire
from trace_core.alert_rules import AlertEvent, Planned, Route, alert_key, plan_deliveries
from trace_core.delivery import delivery_key
from trace_core.lifecycle import RetryPolicy
from trace_core.testing import MemoryObjectStore, MemoryQueue, MemorySigner
from trace_lite.delivery import DeliveryStore
from trace_lite.dispatcher import Dispatcher, open_pool
from trace_lite.orgs import Orgs

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


async def setup(url: str) -> tuple[Any, DeliveryStore, str, int, dict[str, str], str]:
    """A pool, the store, a running task (id, attempt), destination ids by name, the org id."""
    pool = await open_pool(url, min_size=1, max_size=4)
    org_id = await Orgs(pool).org_id(ORG, create=True)
    store = DeliveryStore(pool)
    ids = {}
    for name in ROUTE.destinations:
        row = await store.add_destination(
            org_id=org_id,
            name=name,
            kind="webhook",
            url=f"https://{name}.example.com/hook",
            secret_name=f"trace/org/{org_id}/webhooks.{name}",
        )
        ids[name] = row.destination_id
    d = Dispatcher(
        pool,
        signer=MemorySigner(),
        queue=MemoryQueue("q"),
        object_store=MemoryObjectStore(),
        retry=RetryPolicy(),
    )
    (info,) = await d.create_tasks([wire.CreateTaskRequest(operator="alert_route", org=ORG)])
    claim = await d.claim(info.task_id)
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


async def main_async(n: int, batch: int, runs: int) -> None:
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
        print(f"machine: {os.cpu_count()} cores; server: {pg.server_settings()}")
    finally:
        pg.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--events", type=int, default=20_000)
    p.add_argument("--batch", type=int, default=200)
    p.add_argument("--runs", type=int, default=5)
    args = p.parse_args()
    asyncio.run(main_async(args.events, args.batch, args.runs))


if __name__ == "__main__":
    main()
