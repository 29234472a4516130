"""Sink benchmark: rows per second through the sink of a buffered Postgres dataset.

    .venv/bin/python -m bench.sink [--rows 1000000] [--batch 1000]

Publishes ``--rows`` rows as JSON-lines buffer batches of ``--batch`` rows (setup, not timed),
forwards the announcements to the dataset's queue (timed apart), then times the sink draining
the queue -- receive, strict parse, COPY into a temporary table, ``INSERT … ON CONFLICT DO
NOTHING``, commit, upstream event, delete -- with 1 sink and with 2 sinks (two ``Sink``
objects with their own connections, concurrent in this one process), each on its own dataset
with the same rows. Next to it, on the same Postgres in the same run, the raw baseline: a loop
over the same JSON-lines batches that parses them and does the same COPY + ``INSERT … ON
CONFLICT`` per batch into a table of the same shape, one transaction per batch.

It also prints where the sink's time goes: parsing + dedupe keys alone (pure CPU, no I/O).
Target (issue #10): one sink at >= 50% of raw.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from psycopg import sql

from bench.common import BenchPostgres
from trace_core import wire
from trace_core.lifecycle import RetryPolicy
from trace_core.sink import DatasetSchema, dedupe_keys, parse_batch
from trace_core.testing import MemoryQueue, MemorySigner
from trace_lite.buffer_forwarder import BufferForwarder, queue_name, topic
from trace_lite.dags import Dags
from trace_lite.datasets import Datasets
from trace_lite.dispatcher import Dispatcher, open_pool
from trace_lite.local_store import LocalObjectStore
from trace_lite.migrate import migrate
from trace_lite.pg_queue import PgQueue
from trace_lite.sink import Sink, load_dataset
from trace_servers.dag_cli import builtin_operators

ORG = "bench"
SCHEMA = {"n": "int64", "tx_hash": "bytes", "value": "uint256", "note": "string"}


def dag(name: str) -> dict[str, Any]:
    return {
        "name": f"dag_{name}",
        "jobs": {
            "produce": {
                "operator": "emit_events",
                "triggers": [{"type": "manual"}],
                "outputs": [
                    {
                        "storage": "postgres_table",
                        "update_strategy": "append",
                        "buffered": True,
                        "unique_key": ["n"],
                        "schema": SCHEMA,
                    }
                ],
            }
        },
        "publish": [{"job": "produce", "output": 0, "dataset": name}],
    }


def batches(rows: int, size: int) -> list[bytes]:
    out = []
    for start in range(0, rows, size):
        lines = [
            json.dumps(
                {"n": n, "tx_hash": f"0x{n:064x}", "value": str(n * 10**18), "note": f"row {n}"}
            ).encode()
            + b"\n"
            for n in range(start, min(rows, start + size))
        ]
        out.append(b"".join(lines))
    return out


async def publish(d: Dispatcher, store: LocalObjectStore, dataset: str, data: list[bytes]) -> None:
    (info,) = await d.create_tasks([wire.CreateTaskRequest(operator="noop", org=ORG)])
    c = await d.claim(info.task_id)
    fence = {"task_id": c.task_id, "attempt": c.attempt, "lease_token": c.lease_token}
    prefix = (await d.fetch(c.task_id)).staging_prefix
    for i, body in enumerate(data):
        key = f"{prefix}buffer/{dataset}/b{i}.jsonl"
        put = await store.put(key, body)
        rows = body.count(b"\n")
        batch = wire.BufferBatchIn(f"b{i}", dataset, key, rows, put.size, put.sha256)
        await d.publish_buffer(wire.BufferPublishRequest(**fence, batch=batch))


async def run_sinks(
    state_url: str, data_url: str, store: LocalObjectStore, dataset: str, n: int
) -> float:
    """Drain the dataset's queue with ``n`` concurrent sinks; returns seconds."""
    pools = [
        (await open_pool(state_url, min_size=1, max_size=3), await open_pool(data_url, min_size=1))
        for _ in range(n)
    ]
    try:
        ds = await load_dataset(pools[0][0], ORG, dataset)
        sinks = [
            Sink(
                state_pool=s,
                data_pool=dd,
                object_store=store,
                queue=PgQueue(s, queue_name(ds.dataset_uuid)),
                org=ORG,
                dataset=dataset,
            )
            for s, dd in pools
        ]

        async def drain(sink: Sink) -> None:
            while await sink.process_once(max_messages=10):
                pass

        t0 = time.perf_counter()
        await asyncio.gather(*(drain(s) for s in sinks))
        return time.perf_counter() - t0
    finally:
        for s, dd in pools:
            await s.close()
            await dd.close()


async def run_raw(data_url: str, data: list[bytes]) -> float:
    """Parse each batch and COPY + INSERT … ON CONFLICT it, one transaction per batch."""
    pool = await open_pool(data_url, min_size=1, max_size=2)
    cols = sql.SQL("n bigint, tx_hash bytea, value numeric(78,0), note text, k text NOT NULL")
    try:
        async with pool.connection() as conn:
            await conn.execute(sql.SQL("CREATE TABLE data.raw_bench ({}, UNIQUE (k))").format(cols))
        t0 = time.perf_counter()
        for body in data:
            rows = []
            for line in body.splitlines():
                r = json.loads(line)
                rows.append(
                    (
                        r["n"],
                        bytes.fromhex(r["tx_hash"][2:]),
                        int(r["value"]),
                        r["note"],
                        str(r["n"]),
                    )
                )
            async with pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
                await cur.execute(
                    sql.SQL("CREATE TEMPORARY TABLE raw_in ({}) ON COMMIT DROP").format(cols)
                )
                async with cur.copy("COPY raw_in FROM STDIN") as copy:
                    copy.set_types(["bigint", "bytea", "numeric", "text", "text"])
                    for row in rows:
                        await copy.write_row(row)
                await cur.execute(
                    "INSERT INTO data.raw_bench SELECT * FROM raw_in ON CONFLICT (k) DO NOTHING"
                )
        return time.perf_counter() - t0
    finally:
        await pool.close()


def parse_only(data: list[bytes]) -> float:
    schema = DatasetSchema.of(SCHEMA, ["n"])
    t0 = time.perf_counter()
    for body in data:
        parsed = parse_batch(body, schema)
        dedupe_keys(
            parsed,
            schema,
            producer_task_id="00000000-0000-4000-8000-000000000000",
            dataset_uuid="00000000-0000-4000-8000-000000000001",
            scope=None,
        )
    return time.perf_counter() - t0


async def main_async(rows: int, size: int) -> None:
    pg = BenchPostgres().start()
    try:
        _, state_url = pg.fresh(trace_schema=False)
        _, data_url = pg.fresh(trace_schema=False)
        migrate(state_url, data_url)
        data = batches(rows, size)
        with tempfile.TemporaryDirectory() as tmp:
            store = LocalObjectStore(Path(tmp), "http://127.0.0.1:1", b"k" * 32)
            pool = await open_pool(state_url, min_size=1, max_size=4)
            try:
                await Datasets(pool, object_store=store).set_member(None, ORG, "b", ["admin"])
                dags = Dags(pool, operators=builtin_operators())
                d = Dispatcher(
                    pool,
                    signer=MemorySigner(),
                    queue=MemoryQueue("q"),
                    object_store=store,
                    retry=RetryPolicy(),
                )
                forward_s = 0.0
                for name in ("one_sink", "two_sinks"):
                    await dags.deploy(None, ORG, dag(name))
                    await publish(d, store, name, data)
                    fwd = BufferForwarder(
                        pool, lambda u: PgQueue(pool, queue_name(u)), topics=[topic(name)]
                    )
                    t0 = time.perf_counter()
                    await fwd.drain()
                    forward_s += time.perf_counter() - t0
            finally:
                await pool.close()
            one = await run_sinks(state_url, data_url, store, "one_sink", 1)
            two = await run_sinks(state_url, data_url, store, "two_sinks", 2)
        raw = await run_raw(data_url, data)
        cpu = parse_only(data)
        print(f"sink benchmark: {rows:,} rows in batches of {size:,} ({len(data)} batches)")
        print(f"{'scenario':<34}{'seconds':>10}{'rows/s':>12}{'vs raw':>9}")
        for label, secs in (
            ("raw COPY + INSERT ON CONFLICT", raw),
            ("sink x1", one),
            ("sink x2 (one process)", two),
        ):
            print(f"{label:<34}{secs:>10.2f}{rows / secs:>12,.0f}{raw / secs:>8.0%}")
        print(f"forwarding {2 * len(data)} announcements: {forward_s:.2f} s (not in the above)")
        print(f"where sink x1's time goes: parse + dedupe keys (CPU) {cpu:.2f} s = {cpu / one:.0%}")
        print(f"server: {pg.server_settings()}")
    finally:
        pg.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--batch", type=int, default=1000)
    args = p.parse_args()
    asyncio.run(main_async(args.rows, args.batch))


if __name__ == "__main__":
    main()
