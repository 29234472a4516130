"""Sink benchmark: rows per second through the sink of a buffered Postgres dataset, with the
sink in its own process(es), next to a raw COPY + INSERT loop.

    .venv/bin/python -m bench.sink [--rows 1000000] [--batch 1000] [--runs 3]

Each run gets fresh state and data databases and, in this order, times:

* **raw**: a loop in this process over the same JSON-lines batches that parses them and does
  COPY into a temporary table + ``INSERT … ON CONFLICT DO NOTHING`` per batch, one transaction
  per batch, into a table of the same shape (the baseline);
* **sink x1 / x2 processes**: one or two ``trace sink run --dataset D`` processes are started
  and left idle until they serve the dataset; then the writer (this process, another OS
  process than the sinks) publishes every batch through the Dispatcher library (stage the
  object, ``publish_buffer``: pointer + outbox row), and the clock stops when the last batch's
  ``rows_committed`` event exists. So the time covers publishing, forwarding to the dataset's
  queue (by the sink processes), receive, strict parse, COPY + ``INSERT … ON CONFLICT``, commit,
  event and delete, with writers and sinks running at once.

It prints, per scenario, the median over ``--runs`` of seconds and rows/s and the median of the
per-run ratios to raw, the writer's publishing time, and where a sink's time goes: parsing +
dedupe keys alone (pure CPU) and the CPU the sink processes used against the wall time (the
rest is waiting: on Postgres commits, on the queue, on a core). Target (issue #10): one sink
at >= 50% of raw.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from psycopg import sql

from bench import cli_procs, library
from bench.common import BenchPostgres
from trace_core import wire
from trace_core.sink import DatasetSchema, dedupe_keys, parse_batch
from trace_lite.config import LiteSettings
from trace_lite.dags import Dags
from trace_lite.datasets import Datasets
from trace_lite.dispatcher import Dispatcher, open_pool
from trace_lite.local_store import LocalObjectStore
from trace_lite.migrate import migrate
from trace_lite.sink import load_dataset
from trace_servers.dag_cli import builtin_operators

ORG = "bench"
#: CPU seconds (user + sys) the sink processes of each scenario used per run, start to stop.
SINK_CPU: dict[int, list[float]] = {}
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
    c = await library.running_task(d, "noop", ORG)
    fence = {"task_id": c.task_id, "attempt": c.attempt, "lease_token": c.lease_token}
    prefix = (await d.fetch(c.task_id)).staging_prefix
    for i, body in enumerate(data):
        key = f"{prefix}buffer/{dataset}/b{i}.jsonl"
        put = await store.put(key, body)
        rows = body.count(b"\n")
        batch = wire.BufferBatchIn(f"b{i}", dataset, key, rows, put.size, put.sha256)
        await d.publish_buffer(wire.BufferPublishRequest(**fence, batch=batch))


def start_sinks(env: dict[str, str], dataset: str, n: int) -> list[subprocess.Popen[bytes]]:
    """``n`` ``trace sink run --dataset`` processes, returned once each serves the dataset
    (its queue created, its consumer started); their logs go to ``$TRACE_HOME/sink-*.log``."""
    argv = ["sink", "run", "--org", ORG, "--dataset", dataset]
    return cli_procs.start_running(env, argv, n, f"sink-{dataset}")


async def run_sink_processes(
    env: dict[str, str],
    d: Dispatcher,
    store: LocalObjectStore,
    dataset: str,
    data: list[bytes],
    n: int,
) -> tuple[float, float]:
    """Start ``n`` sink processes for ``dataset``, then publish ``data`` from this process;
    returns (seconds until the last batch's event, seconds the writer took to publish)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    procs = start_sinks(env, dataset, n)
    try:
        ds = await load_dataset(d.pool, ORG, dataset)
        t0 = time.perf_counter()
        await publish(d, store, dataset, data)
        published = time.perf_counter() - t0
        prefix = f"sink/{ds.dataset_uuid}/%"
        while True:
            async with d.pool.connection() as conn:
                cur = await conn.execute(
                    "SELECT count(*) FROM task_events WHERE event_key LIKE %s", (prefix,)
                )
                row = await cur.fetchone()
            if row is not None and row[0] >= len(data):
                return time.perf_counter() - t0, published
            await asyncio.sleep(0.02)
    finally:
        cli_procs.stop(procs)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        SINK_CPU.setdefault(n, []).append(cpu)


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
    t0 = time.process_time()  # CPU time: other processes' load does not count
    for body in data:
        parsed = parse_batch(body, schema)
        dedupe_keys(
            parsed,
            schema,
            producer_task_id="00000000-0000-4000-8000-000000000000",
            dataset_uuid="00000000-0000-4000-8000-000000000001",
            scope=None,
        )
    return time.process_time() - t0


async def one_run(pg: BenchPostgres, data: list[bytes], home: Path) -> dict[str, float]:
    """One run on fresh databases: raw, sink x1 and sink x2 (processes); seconds each."""
    _, state_url = pg.fresh(trace_schema=False)
    _, data_url = pg.fresh(trace_schema=False)
    migrate(state_url, data_url)
    out = {"raw": await run_raw(data_url, data)}
    env = cli_procs.cli_env(home, state_url, data_url)
    settings = LiteSettings.from_env(env)
    store = LocalObjectStore(settings.object_root, "http://127.0.0.1:1", b"k" * 32)
    pool = await open_pool(state_url, min_size=1, max_size=4)
    try:
        await Datasets(pool, object_store=store).set_member(None, ORG, "b", ["admin"])
        dags = Dags(pool, operators=builtin_operators())
        d = library.dispatcher(pool, store)
        for n in (1, 2):
            name = f"sink_x{n}"
            await dags.deploy(None, ORG, dag(name))
            total, published = await run_sink_processes(env, d, store, name, data, n)
            out[name], out[f"publish_x{n}"] = total, published
    finally:
        await pool.close()
    return out


async def main_async(rows: int, size: int, runs: int) -> None:
    pg = BenchPostgres().start()
    try:
        data = batches(rows, size)
        results = []
        with tempfile.TemporaryDirectory() as tmp:
            for i in range(runs):
                results.append(await one_run(pg, data, Path(tmp) / f"run{i}"))
                print(
                    f"run {i + 1}/{runs}: "
                    + ", ".join(f"{k} {v:.2f} s" for k, v in results[-1].items()),
                    flush=True,
                )
        cpu = parse_only(data)
        med = {k: statistics.median(r[k] for r in results) for k in results[0]}
        print(
            f"sink benchmark: {rows:,} rows in batches of {size:,} ({len(data)} batches), medians of {runs} runs"
        )
        print(f"{'scenario':<40}{'seconds':>9}{'rows/s':>11}{'vs raw':>8}")
        for label, key in (
            ("raw COPY + INSERT ON CONFLICT (1 loop)", "raw"),
            ("sink x1 process (+ writer process)", "sink_x1"),
            ("sink x2 processes (+ writer process)", "sink_x2"),
        ):
            ratio = statistics.median(r["raw"] / r[key] for r in results)
            print(f"{label:<40}{med[key]:>9.2f}{rows / med[key]:>11,.0f}{ratio:>8.0%}")
        print(
            f"the writer published every batch in {med['publish_x1']:.2f} s (x1) / "
            f"{med['publish_x2']:.2f} s (x2), while the sinks ran"
        )
        print(
            f"where a sink's time goes: parse + dedupe keys (CPU) {cpu:.2f} s = {cpu / med['sink_x1']:.0%} of sink x1"
        )
        for n in (1, 2):
            used = statistics.median(SINK_CPU[n])
            print(
                f"sink x{n}: its processes used {used:.2f} s of CPU (user + sys, start to stop, "
                f"incl. start-up) in {med[f'sink_x{n}']:.2f} s of wall time"
            )
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        print(f"machine: {os.cpu_count()} cores, load average {load}")
        print(f"server: {pg.server_settings()}")
    finally:
        pg.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    asyncio.run(main_async(args.rows, args.batch, args.runs))


if __name__ == "__main__":
    main()
