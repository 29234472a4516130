"""Dataset benchmarks: completion with an output manifest, and resolve.

    .venv/bin/python -m bench.datasets [--runs 5]

* completion latency with a manifest of 1, 100 and 10,000 partitions (objects staged in a real
  LocalObjectStore; the Dispatcher heads every object, plans, and records in the completion's
  transaction), next to a raw baseline: the same partition INSERT (unnest) in one transaction;
* resolve latency (p50/p95) for a user who can see 100 datasets (resolving one name, and all
  100 at once, pinned), next to a raw baseline: the same pointer-read statement without
  permission checks or pins.

Targets: 10,000 partitions committed in under 1 s; resolve p50 under 5 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench.common import BenchPostgres
from trace_core import wire
from trace_core.testing import MemoryQueue, MemorySigner
from trace_lite.datasets import Datasets
from trace_lite.dispatcher import Dispatcher, open_pool
from trace_lite.local_store import LocalObjectStore

ORG, DAG = "bench", "bench_dag"


async def _completion(url: str, root: Path, n: int) -> tuple[float, float]:
    pool = await open_pool(url, min_size=2, max_size=8)
    try:
        store = LocalObjectStore(root, "http://127.0.0.1:1", b"k" * 32)
        d = Dispatcher(pool, signer=MemorySigner(), queue=MemoryQueue("q"), object_store=store)
        ds = Datasets(pool, object_store=store)
        await ds.ensure_dag(ORG, DAG)
        name = f"d_{uuid.uuid4().hex[:8]}"
        await ds.register(ORG, name, dag=DAG, job="j")
        await ds.cutover(None, ORG, DAG, {name: await ds.open_version(None, ORG, name)})
        (info,) = await d.create_tasks([wire.CreateTaskRequest(operator="x", org=ORG)])
        c = await d.claim(info.task_id)
        prefix = (await d.fetch(c.task_id, c.attempt)).staging_prefix
        outputs: list[dict[str, Any]] = []
        for i in range(n):
            data = f'{{"i":{i}}}'.encode()
            key = f"{prefix}{i * 10}_{i * 10 + 10}.json"
            await store.put(key, data)
            outputs.append(
                {
                    "dataset": name,
                    "object_key": key,
                    "size": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "partition": {"start": i * 10, "end": i * 10 + 10},
                }
            )
        req = wire.structure(
            {
                "task_id": c.task_id,
                "attempt": c.attempt,
                "lease_token": c.lease_token,
                "outputs": outputs,
            },
            wire.CompleteRequest,
        )
        store._sha_cache.clear()  # the Dispatcher did not write them: it hashes every object
        t0 = time.perf_counter()
        await d.complete(req)
        trace_s = time.perf_counter() - t0
        # raw baseline: the same rows inserted in one transaction, no checks
        version = await ds.open_version(None, ORG, name)
        t0 = time.perf_counter()
        async with pool.connection() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO dataset_partitions (dataset_version, range_start, range_end, "
                "object_key, staged_key, size, sha256, task_id, attempt) "
                "SELECT %s, s, s + 10, 'k' || s, 'k' || s, 1, 'x', %s, 1 "
                "FROM unnest(%s::bigint[]) AS s",
                (version, c.task_id, [i * 10 for i in range(n)]),
            )
        raw_s = time.perf_counter() - t0
        return trace_s, raw_s
    finally:
        await pool.close()


async def _resolve(url: str, iterations: int) -> dict[str, float]:
    pool = await open_pool(url, min_size=2, max_size=8)
    try:
        ds = Datasets(pool)
        await ds.ensure_dag(ORG, DAG, deployers=["reader"])
        names = [f"ds_{i:03d}" for i in range(100)]
        for n in names:
            await ds.register(ORG, n, dag=DAG, job="j")
        await ds.cutover(None, ORG, DAG, {n: await ds.open_version(None, ORG, n) for n in names})
        caller = await ds.user_caller(ORG, "reader")
        org_id = await ds.org_id(ORG)
        out: dict[str, float] = {}
        for label, batch in (("1 name", names[:1]), ("100 names", names)):
            lat = []
            for i in range(iterations):
                t0 = time.perf_counter()
                await ds.resolve(caller, ORG, batch if i % 2 == 0 else batch[::-1])
                lat.append(time.perf_counter() - t0)
            out[f"resolve {label} p50"] = statistics.median(lat)
            out[f"resolve {label} p95"] = sorted(lat)[int(len(lat) * 0.95)]
            raw = []
            for _ in range(iterations):
                t0 = time.perf_counter()
                async with pool.connection() as conn:
                    await (
                        await conn.execute(
                            "SELECT d.name, p.dataset_version FROM datasets d "
                            "JOIN dags g ON g.dag_id = d.dag_id LEFT JOIN dag_pointers p "
                            "ON p.dag_id = g.dag_id AND p.generation = g.active_generation "
                            "AND p.dataset_uuid = d.dataset_uuid "
                            "WHERE d.org_id = %s AND d.name = ANY(%s)",
                            (org_id, batch),
                        )
                    ).fetchall()
                raw.append(time.perf_counter() - t0)
            out[f"raw pointer read {label} p50"] = statistics.median(raw)
        return out
    finally:
        await pool.close()


async def main_async(runs: int) -> None:
    pg = BenchPostgres().start()
    try:
        print("completion with an output manifest (median of runs; raw = same INSERT only)")
        print(f"{'partitions':>10} {'trace ms':>10} {'raw ms':>10} {'ratio':>7}")
        for n in (1, 100, 10_000):
            samples = []
            for _ in range(runs if n < 10_000 else max(1, runs // 2)):
                _, url = pg.fresh(trace_schema=True)
                with tempfile.TemporaryDirectory() as tmp:
                    samples.append(await _completion(url, Path(tmp), n))
            t = statistics.median(s[0] for s in samples) * 1000
            r = statistics.median(s[1] for s in samples) * 1000
            print(f"{n:>10} {t:>10.1f} {r:>10.1f} {t / r:>6.1f}x")
        _, url = pg.fresh(trace_schema=True)
        res = await _resolve(url, 200 * runs)
        print("\nresolve for a user who can see 100 datasets (pinned)")
        for k, v in res.items():
            print(f"  {k:32s} {v * 1000:8.2f} ms")
    finally:
        pg.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--runs", type=int, default=3)
    asyncio.run(main_async(p.parse_args().runs))


if __name__ == "__main__":
    main()
