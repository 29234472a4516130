"""Query Service benchmark: latency through the service vs DuckDB directly on the same data,
in the same run, and queries per second.

    .venv/bin/python -m bench.query [--rows 1000000] [--runs 15] [--qps-queries 60]
        [--only tiny,aggregate,pg_aggregate]

A private PostgreSQL cluster in a temporary directory (``TRACE_BENCH_DATABASE_URL`` to use a
server of your own instead): a state and a data database, a LocalObjectStore, three published
datasets: ``tiny`` (10 rows) and ``events`` (``--rows`` rows, one Parquet object), and
``pgevents`` (the same ``--rows`` rows in a Postgres table of the data database). The service is
what ``trace dispatcher`` mounts: ``make_app`` with a user JWT and the data database, the Query
Service with its pool of two pre-started sandboxes (forked by its fork server) and two
sandboxes at once, served over HTTP on loopback and called with aiohttp. For each query, runs
alternate (service, bare, service, bare, ...) so machine load hits both alike:

* **service**: ``POST /v1/query`` (JWT verified, membership, parse + gate, resolve + pin, a
  pre-started sandbox: gate again, its views over its copy of the pinned data, lock down, run,
  answer, release);
* **bare**: the same SQL on one warm in-process DuckDB connection with a view over the same
  Parquet file; for ``pg_aggregate``, the rows fetched from Postgres as the service does
  (``COPY ... TO STDOUT`` as CSV into a file) and the SQL over ``read_csv`` of it: bare DuckDB
  has no way to read a Postgres table here (the postgres extension is not installed, and the
  service never loads it where user SQL runs). ``pg_aggregate (engine)`` also prints the same
  SQL over the rows already in a DuckDB table: the engine alone, no fetch.

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
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import duckdb
import psycopg
from aiohttp.test_utils import TestServer

from bench.common import BenchPostgres
from trace_core import wire
from trace_core.lifecycle import RetryPolicy
from trace_core.testing import MemoryQueue, MemorySigner
from trace_lite.datasets import Datasets
from trace_lite.dispatcher import Dispatcher, open_pool
from trace_lite.embedded_pg import EmbeddedPostgres
from trace_lite.local_store import LocalObjectStore
from trace_lite.migrate import migrate
from trace_lite.users import LocalUserIssuer, UserAuthenticator
from trace_servers.app import make_app

ORG, DAG = "bench", "bench"
QUERIES = {
    "tiny": "SELECT count(*) AS n FROM tiny",
    "aggregate": (
        "SELECT k % 100 AS g, count(*) AS n, sum(v) AS s, avg(v) AS a "
        "FROM events GROUP BY 1 ORDER BY 1"
    ),
    "pg_aggregate": (
        "SELECT k % 100 AS g, count(*) AS n, sum(v) AS s, avg(v) AS a "
        "FROM pgevents GROUP BY 1 ORDER BY 1"
    ),
}


async def _publish(
    d: Dispatcher,
    ds: Datasets,
    store: LocalObjectStore,
    data: dict[str, bytes],
    tables: dict[str, str],
) -> None:
    """Write one version of each Parquet dataset through a task's completion and cut it over,
    with the Postgres-table datasets' versions (``tables``: name -> version)."""
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
    await ds.cutover(None, ORG, DAG, {**versions, **tables})


def _parquet(tmp: Path, name: str, select: str) -> bytes:
    path = tmp / f"{name}.parquet"
    duckdb.sql(f"COPY ({select}) TO '{path}' (FORMAT parquet)")
    return path.read_bytes()


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p * (len(ordered) - 1)))]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def main_async(
    rows: int, runs: int, qps_queries: int, pace_s: float = 1.5, only: tuple[str, ...] = ()
) -> None:
    with tempfile.TemporaryDirectory(prefix="trace-bench-query-") as tmp_dir:
        tmp = Path(tmp_dir)
        pg = BenchPostgres()
        if pg.owned:  # a private cluster: the shared bench cluster may be stopped by another run
            pg.cluster = EmbeddedPostgres(tmp / "pg", port=_free_port())
        pg.start()
        try:
            _name, url = pg.fresh(trace_schema=True)
            _name, data_url = pg.fresh(trace_schema=False)
            migrate(url, data_url)
            await _run(tmp, url, data_url, rows, runs, qps_queries, pace_s, only or tuple(QUERIES))
        finally:
            pg.stop()


def _fill_postgres(data_url: str, table: str, rows: int) -> None:
    with psycopg.connect(data_url, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE data.{table} (k bigint, v bigint)")
        conn.execute(
            f"INSERT INTO data.{table} SELECT g, (g::bigint * 7919) % 1000003 "
            f"FROM generate_series(0, {rows - 1}) AS g"
        )
        conn.execute(f"VACUUM ANALYZE data.{table}")


def _bare_postgres(data_url: str, table: str, dest: Path, sql: str) -> Any:
    """Bare DuckDB on the Postgres table: fetch the rows as the service does (CSV over COPY),
    then the SQL over them."""
    with psycopg.connect(data_url) as conn, dest.open("wb") as out:
        with conn.cursor().copy(
            f"COPY (SELECT k, v FROM data.{table}) TO STDOUT (FORMAT csv)"
        ) as cp:
            for chunk in cp:
                out.write(chunk)
    con = duckdb.connect()
    try:
        con.execute(
            f"CREATE VIEW pgevents AS SELECT * FROM read_csv('{dest}', header = false, "
            "auto_detect = false, columns = {'k': 'BIGINT', 'v': 'BIGINT'})"
        )
        return con.execute(sql).fetchall()
    finally:
        con.close()


def _engine(bare: duckdb.DuckDBPyConnection, pg_csv: Path, runs: int, service_s: float) -> None:
    """``pg_aggregate`` over the rows already in a DuckDB table: the engine alone, no fetch."""
    bare.execute(
        f"CREATE TABLE pgevents AS SELECT * FROM read_csv('{pg_csv}', header = false, "
        "auto_detect = false, columns = {'k': 'BIGINT', 'v': 'BIGINT'})"
    )
    engine = []
    for _ in range(runs):
        t = time.perf_counter()
        bare.execute(QUERIES["pg_aggregate"]).fetchall()
        engine.append(time.perf_counter() - t)
    e50 = statistics.median(engine)
    print(
        f"pg_aggregate (engine: bare DuckDB over the rows already in a table) p50 "
        f"{e50 * 1000:.1f} ms; service / engine {service_s / e50:.1f}x"
    )


async def _run(
    tmp: Path,
    url: str,
    data_url: str,
    rows: int,
    runs: int,
    qps_queries: int,
    pace_s: float,
    only: tuple[str, ...],
) -> None:
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
    await ds.register(
        ORG, "pgevents", dag=DAG, job="j", storage_kind="postgres", read_roles=["analyst"]
    )
    pg_version = await ds.open_version(None, ORG, "pgevents")
    table = f"dsv_{pg_version.replace('-', '')}"
    _fill_postgres(data_url, table, rows)
    await _publish(d, ds, store, data, {"pgevents": pg_version})

    bare = duckdb.connect()
    for name in data:
        bare.execute(
            f"CREATE VIEW {name} AS SELECT * FROM read_parquet('{tmp / (name + '.parquet')}')"
        )

    issuer = LocalUserIssuer.init(tmp / "keys")
    app = make_app(
        d,
        platform_token="p" * 32,
        user_auth=UserAuthenticator({issuer.key.kid: issuer.key}),
        data_url=data_url,
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

            pg_csv = tmp / "pgevents.csv"

            def run_bare(name: str, sql: str) -> Any:
                if name == "pg_aggregate":
                    return _bare_postgres(data_url, table, pg_csv, sql)
                return bare.execute(sql).fetchall()

            for name, sql in QUERIES.items():  # warm: the pool fills, files cached, answers agree
                expected = [list(r) for r in run_bare(name, sql)]
                assert await service(sql) == expected, sql
            print(f"Query Service vs bare DuckDB, {rows:,} rows in `events`, {runs} runs each")
            print(
                f"{'query':<10} {'service p50':>12} {'p95':>9} {'bare p50':>10} {'p95':>9} "
                f"{'ratio p50':>10}"
            )
            medians: dict[str, tuple[float, float]] = {}
            for name, sql in QUERIES.items():
                if name not in only:
                    continue
                s_times: list[float] = []
                b_times: list[float] = []
                for _ in range(runs):
                    t = time.perf_counter()
                    await service(sql)
                    s_times.append(time.perf_counter() - t)
                    t = time.perf_counter()
                    run_bare(name, sql)
                    b_times.append(time.perf_counter() - t)
                s50, b50 = statistics.median(s_times), statistics.median(b_times)
                medians[name] = (s50, b50)
                print(
                    f"{name:<10} {s50 * 1000:>10.1f}ms {_pct(s_times, 0.95) * 1000:>7.1f}ms "
                    f"{b50 * 1000:>8.1f}ms {_pct(b_times, 0.95) * 1000:>7.1f}ms "
                    f"{s50 / b50:>9.1f}x"
                )
            if "pg_aggregate" in only:
                _engine(bare, pg_csv, runs, medians["pg_aggregate"][0])
            if "tiny" not in only:
                return
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
    p.add_argument(
        "--only",
        default=",".join(QUERIES),
        help="comma-separated queries to time (default: all); e.g. tiny,aggregate",
    )
    args = p.parse_args()
    only = tuple(args.only.split(","))
    if unknown := set(only) - set(QUERIES):
        p.error(f"unknown queries: {sorted(unknown)}")
    asyncio.run(main_async(args.rows, args.runs, args.qps_queries, only=only))


if __name__ == "__main__":
    main()
