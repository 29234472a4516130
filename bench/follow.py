"""Head-lag benchmark: how far behind a live 0.4 s chain the head follower's data lands.

    .venv/bin/python -m bench.follow [--seconds 60] [--chunk 5,20] [--confirmations 2]

Starts anvil mining a block every 0.4 s with live activity (``devnode.LiveActivity``), and per
``--chunk`` value a fresh database with ``examples/monad``'s ``follow`` (interval trigger every
second) and ``ingest`` jobs only, run by an in-process Dispatcher, DAG passes and worker (the
Lite operators). For ``--seconds`` it polls the node's head every 0.1 s and records when each
block first appeared; at the end, each followed block's lag is the time from its appearance to
the commit of the range holding it (the ingest task's ``finished_at``). Prints p50/p95/max of
that lag in seconds, and the blocks not committed by the end. The lag has parts by design: a
block waits for its chunk to fill (up to ``chunk x 0.4 s``) and for ``confirmations`` blocks
after it, then for the next trigger (up to 1 s), the extract and the commit. Not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
import yaml

from bench.common import BenchPostgres
from trace_core.dag import OperatorInfo
from trace_core.lifecycle import RetryPolicy
from trace_core.testing import MemoryQueue, MemorySigner
from trace_lite.chain.devnode import DevNode, LiveActivity, Rpc
from trace_lite.chain.operators import lite_operators
from trace_lite.dag_runs import DagRuns
from trace_lite.dags import Dags
from trace_lite.dataset_gc import DatasetGC
from trace_lite.dispatcher import Dispatcher, open_pool
from trace_lite.local_store import LocalObjectStore
from trace_lite.task_surface import InProcessTaskSurface
from trace_sdk import BUILTIN_OPERATORS, Worker

ORG = "bench"
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "monad" / "monad.yaml"


def _dag(rpc: str, start: int, chunk: int, confirmations: int) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    doc["jobs"] = {k: v for k, v in doc["jobs"].items() if k in ("follow", "ingest")}
    doc["jobs"]["follow"]["triggers"] = [{"type": "interval", "every": "1s"}]
    doc["jobs"]["follow"]["config"].update(start=start, chunk=chunk, confirmations=confirmations)
    doc["jobs"]["ingest"]["inputs"] = [{"from": {"job": "follow", "output": 0}}]
    doc["publish"] = [p for p in doc["publish"] if p["job"] == "ingest"]
    for slots in doc["worker_pools"].values():
        for slot in slots:
            slot["env"]["RPC_URL"] = rpc
    return doc


async def follow(
    pg: BenchPostgres, rpc: Rpc, seconds: float, chunk: int, confirmations: int
) -> dict[str, Any]:
    """One run: the lag of every block that appeared while following."""
    _, url = pg.fresh(trace_schema=True)
    pool = await open_pool(url, min_size=2, max_size=12)
    tmp = Path(f"/tmp/trace-bench-follow-{chunk}")
    store = LocalObjectStore(tmp / "objects", "http://127.0.0.1:1", b"s" * 32)
    lite = lite_operators(pool, store)
    start = (rpc.block_number() // chunk + 1) * chunk
    operators = {n: OperatorInfo(n) for n in [*BUILTIN_OPERATORS, *lite]}
    await Dags(pool, operators=operators).deploy(
        None, ORG, _dag(rpc.url, start, chunk, confirmations)
    )
    queue = MemoryQueue("tasks")
    d = Dispatcher(
        pool,
        signer=MemorySigner(),
        queue=queue,
        object_store=store,
        retry=RetryPolicy(max_attempts=5, base_s=0.2),
    )
    surface = InProcessTaskSurface(d)
    worker = Worker(
        surface=surface, queue=queue, operators={**BUILTIN_OPERATORS, **lite}, store=store
    )
    stop = asyncio.Event()
    loops = [
        asyncio.create_task(d.run_background(stop)),
        asyncio.create_task(worker.run(stop)),
        asyncio.create_task(DatasetGC(pool, store).run_background(stop)),
        asyncio.create_task(DagRuns(pool).run(stop, fan_out_every_s=0.05, schedule_every_s=0.2)),
    ]
    seen: dict[int, float] = {}  # block -> wall time it first appeared at the node
    deadline = time.time() + seconds
    try:
        while time.time() < deadline:
            head = await asyncio.to_thread(rpc.block_number)
            now = time.time()
            for b in range(max(start, max(seen, default=start - 1) + 1), head + 1):
                seen[b] = now
            await asyncio.sleep(0.1)
    finally:
        stop.set()
        await asyncio.gather(*loops)
        await surface.close()
        await pool.close()
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT (result ->> 'start')::int, (result ->> 'end')::int, finished_at "
            "FROM tasks WHERE dag_job = 'ingest' AND state = 'completed'"
        ).fetchall()
    committed: dict[int, datetime] = {}
    for s, e, finished in rows:
        for b in range(s, e):
            committed[b] = finished
    lags = [committed[b].timestamp() - t for b, t in seen.items() if b in committed]
    return {
        "chunk": chunk,
        "confirmations": confirmations,
        "blocks_followed": len(seen),
        "blocks_committed": len(lags),
        "lag_p50_s": round(statistics.median(lags), 2) if lags else None,
        "lag_p95_s": round(sorted(lags)[int(0.95 * (len(lags) - 1))], 2) if lags else None,
        "lag_max_s": round(max(lags), 2) if lags else None,
    }


async def main_async(args: argparse.Namespace) -> list[dict[str, Any]]:
    node = DevNode.start(block_time_s=0.4)
    pg = BenchPostgres().start()
    activity = LiveActivity(node.url).start()
    try:
        return [
            await follow(pg, node.rpc(), args.seconds, int(c), args.confirmations)
            for c in args.chunk.split(",")
        ]
    finally:
        activity.stop()
        pg.stop()
        node.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--chunk", default="5,20", help="comma-separated chunk sizes")
    ap.add_argument("--confirmations", type=int, default=2)
    results = asyncio.run(main_async(ap.parse_args()))
    for r in results:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
