"""Query Service benchmark: latency through the service vs DuckDB directly on the same Parquet,
in the same run, and queries per second.

    .venv/bin/python -m bench.query [--rows 1000000] [--runs 15] [--qps-queries 60]

One fresh database (the bench cluster, as ``python -m bench``), a LocalObjectStore in a temporary
directory, two published datasets: ``tiny`` (10 rows) and ``events`` (``--rows`` rows, one
Parquet object). The service is what ``trace dispatcher`` mounts: ``make_app`` with a user JWT,
the Query Service with its pool of two pre-started sandboxes and two sandboxes at once, served
over HTTP on loopback and called with aiohttp. For each query, runs alternate (service, bare,
service, bare, ...) so machine load hits both alike:

* **service**: ``POST /v1/query`` (JWT verified, membership, parse + gate, resolve + pin, a
  pre-started sandbox: gate again, load the pinned Parquet, lock down, run, answer, release);
* **bare**: the same SQL on one warm in-process DuckDB connection with a view over the same
  Parquet file.

Printed: median and p95 latency of each, the ratio of medians, the per-query overhead (service
minus bare on ``tiny``), ``tiny`` again with a pause between queries (each query then finds a
warm pre-started sandbox; back to back, a query waits for the replacement of the previous
one to finish starting), and queries/second with 1 and 4 concurrent clients on ``tiny``.
Targets (issue #12): overhead p50 <= 50 ms; the aggregate <= 1.5x bare DuckDB.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import duckdb
from aiohttp.test_utils import TestServer

from bench.common import BenchPostgres
from trace_core import wire
from trace_core.lifecycle import RetryPolicy
from trace_core.testing import MemoryQueue, MemorySigner
from trace_lite.datasets import Datasets
from trace_lite.dispatcher import Dispatcher, open_pool
from trace_lite.local_store import LocalObjectStore
from trace_lite.users import LocalUserIssuer, UserAuthenticator
from trace_servers.app import make_app

ORG, DAG = "bench", "bench"
QUERIES = {
    "tiny": "SELECT count(*) AS n FROM tiny",
    "aggregate": (
        "SELECT k % 100 AS g, count(*) AS n, sum(v) AS s, avg(v) AS a "
        "FROM events GROUP BY 1 ORDER BY 1"
    ),
}


async def _publish(
    d: Dispatcher, ds: Datasets, store: LocalObjectStore, data: dict[str, bytes]
) -> None:
    """Write one version of each dataset through a task's completion and cut it over."""
    versions = {name: await ds.open_version(None, ORG, name) for name in data}
    (info,) = await d.create_tasks([wire.CreateTaskRequest(operator="bench", org=ORG)])
    claim = await d.claim(info.task_id)
    payload = await d.fetch(info.task_id, claim.attempt)
    outputs = []
    for name, content in data.items():
        key = f"{payload.staging_prefix}{name}/0.parquet"
        await store.put(key, content)
        outputs.append(
            {
                "dataset": name,
                "object_key": key,
                "size": len(content),
                "sha256": hashlib.sha256(content).hexdigest(),
                "partition": {"start": 0, "end": 1},
                "version": versions[name],
            }
        )
    fence = {"task_id": claim.task_id, "attempt": claim.attempt, "lease_token": claim.lease_token}
    await d.complete(wire.structure({**fence, "outputs": outputs}, wire.CompleteRequest))
    while await ds.promote_once():
        pass
    await ds.cutover(None, ORG, DAG, versions)


def _parquet(tmp: Path, name: str, select: str) -> bytes:
    path = tmp / f"{name}.parquet"
    duckdb.sql(f"COPY ({select}) TO '{path}' (FORMAT parquet)")
    return path.read_bytes()


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p * (len(ordered) - 1)))]


async def main_async(rows: int, runs: int, qps_queries: int, pace_s: float = 1.5) -> None:
    pg = BenchPostgres().start()
    try:
        _name, url = pg.fresh(trace_schema=True)
        with tempfile.TemporaryDirectory(prefix="trace-bench-query-") as tmp_dir:
            await _run(Path(tmp_dir), url, rows, runs, qps_queries, pace_s)
    finally:
        pg.stop()


async def _run(tmp: Path, url: str, rows: int, runs: int, qps_queries: int, pace_s: float) -> None:
    pool = await open_pool(url, min_size=2, max_size=8)
    store = LocalObjectStore(tmp / "objects", "http://127.0.0.1:1", b"s" * 32)
    d = Dispatcher(
        pool,
        signer=MemorySigner(),
        queue=MemoryQueue("tasks"),
        object_store=store,
        retry=RetryPolicy(max_attempts=3, base_s=0.0),
    )
    ds = Datasets(pool, object_store=store)
    await ds.ensure_dag(ORG, DAG)
    await ds.set_member(None, ORG, "bench", ["analyst"])
    data = {
        "tiny": _parquet(tmp, "tiny", "SELECT range AS k FROM range(10)"),
        "events": _parquet(
            tmp,
            "events",
            f"SELECT range AS k, (range * 7919) % 1000003 AS v FROM range({rows})",
        ),
    }
    for name in data:
        await ds.register(ORG, name, dag=DAG, job="j", read_roles=["analyst"])
    await _publish(d, ds, store, data)

    bare = duckdb.connect()
    for name in data:
        bare.execute(
            f"CREATE VIEW {name} AS SELECT * FROM read_parquet('{tmp / (name + '.parquet')}')"
        )

    issuer = LocalUserIssuer.init(tmp / "keys")
    app = make_app(
        d, platform_token="p" * 32, user_auth=UserAuthenticator({issuer.key.kid: issuer.key})
    )
    server = TestServer(app)
    await server.start_server()
    headers = {"Authorization": f"Bearer {issuer.token('bench')}"}
    endpoint = str(server.make_url("/v1/query"))
    try:
        async with aiohttp.ClientSession() as http:

            async def service(sql: str) -> Any:
                async with http.post(endpoint, json={"org": ORG, "sql": sql}, headers=headers) as r:
                    body = await r.json()
                    assert r.status == 200, body
                    return body["rows"]

            for sql in QUERIES.values():  # warm: the pool fills, files cached, answers agree
                expected = [list(r) for r in bare.execute(sql).fetchall()]
                assert await service(sql) == expected, sql
            print(f"Query Service vs bare DuckDB, {rows:,} rows in `events`, {runs} runs each")
            print(
                f"{'query':<10} {'service p50':>12} {'p95':>9} {'bare p50':>10} {'p95':>9} "
                f"{'ratio p50':>10}"
            )
            medians: dict[str, tuple[float, float]] = {}
            for name, sql in QUERIES.items():
                s_times: list[float] = []
                b_times: list[float] = []
                for _ in range(runs):
                    t = time.perf_counter()
                    await service(sql)
                    s_times.append(time.perf_counter() - t)
                    t = time.perf_counter()
                    bare.execute(sql).fetchall()
                    b_times.append(time.perf_counter() - t)
                s50, b50 = statistics.median(s_times), statistics.median(b_times)
                medians[name] = (s50, b50)
                print(
                    f"{name:<10} {s50 * 1000:>10.1f}ms {_pct(s_times, 0.95) * 1000:>7.1f}ms "
                    f"{b50 * 1000:>8.1f}ms {_pct(b_times, 0.95) * 1000:>7.1f}ms "
                    f"{s50 / b50:>9.1f}x"
                )
            s50, b50 = medians["tiny"]
            print(f"per-query overhead p50 (tiny, service - bare): {(s50 - b50) * 1000:.1f} ms")
            paced: list[float] = []
            for _ in range(max(3, runs // 2)):
                await asyncio.sleep(pace_s)  # the pool's replacement sandbox is warm again
                t = time.perf_counter()
                await service(QUERIES["tiny"])
                paced.append(time.perf_counter() - t)
            print(
                f"tiny, one query every {pace_s:.0f} s (a warm pre-started sandbox each time): "
                f"p50 {statistics.median(paced) * 1000:.1f} ms, p95 {_pct(paced, 0.95) * 1000:.1f} ms"
            )
            for clients in (1, 4):
                per_client = max(1, qps_queries // clients)

                async def client(per_client: int = per_client) -> None:
                    for _ in range(per_client):
                        await service(QUERIES["tiny"])

                t = time.perf_counter()
                await asyncio.gather(*(client() for _ in range(clients)))
                elapsed = time.perf_counter() - t
                print(
                    f"queries/s on tiny, {clients} client(s): "
                    f"{per_client * clients / elapsed:.1f} ({per_client * clients} queries)"
                )
    finally:
        await server.close()
        bare.close()
        await pool.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--runs", type=int, default=15)
    p.add_argument("--qps-queries", type=int, default=60)
    args = p.parse_args()
    asyncio.run(main_async(args.rows, args.runs, args.qps_queries))


if __name__ == "__main__":
    main()
