"""Ingest benchmark: blocks per second through ``cryo_ingest`` against bare ``cryo.freeze``.

    .venv/bin/python -m bench.ingest [--blocks 3000] [--chunk 500] [--concurrency 1]

Starts a local anvil node (``scripts/bootstrap.sh`` installs it), makes activity (contract
calls with logs, transfers, empty blocks) and pads the chain with empty blocks up to
``--blocks``. Then, on the same node and range, in the same run:

* bare: one ``cryo.freeze`` of blocks, transactions and logs over ``[0, blocks)`` with
  ``chunk_size = --chunk``, in a child process (as the operator runs it; the child's start is
  counted);
* Trace: ``blocks / chunk`` ``cryo_ingest`` tasks through the in-process Dispatcher on a fresh
  Postgres database and a worker running ``--concurrency`` at a time: claim, extract (a child
  per task), stage into the LocalObjectStore, commit with the completion.

Prints both rates and their ratio (issue #11's target: Trace >= 80% of bare). Not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import BenchPostgres
from trace_core import wire
from trace_core.lifecycle import RetryPolicy
from trace_core.testing import MemoryQueue, MemorySigner
from trace_lite.chain.devnode import DevNode, make_activity, mine_empty
from trace_lite.datasets import Datasets
from trace_lite.dispatcher import Dispatcher, open_pool
from trace_lite.local_store import LocalObjectStore
from trace_lite.task_surface import InProcessTaskSurface
from trace_sdk import BUILTIN_OPERATORS, Worker

ORG = "bench"
DATATYPES = ("blocks", "transactions", "logs")

BARE = """
import json, os, sys, cryo
req = json.loads(sys.argv[1])
s = cryo.freeze(["blocks", "transactions", "logs"], blocks=[f"0:{req['blocks']}"],
                rpc=req["rpc"], output_dir=req["out"], chunk_size=req["chunk"], verbose=False,
                no_report=True, inner_request_size=100, max_retries=2)
print(json.dumps(s), flush=True)
os._exit(0 if s["n_errored"] == 0 else 1)
"""


def bare(rpc: str, blocks: int, chunk: int) -> float:
    with tempfile.TemporaryDirectory() as out:
        req = json.dumps({"rpc": rpc, "blocks": blocks, "chunk": chunk, "out": out})
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", BARE, req], check=True, capture_output=True)
        return time.perf_counter() - t0


async def through_trace(rpc: str, blocks: int, chunk: int, concurrency: int) -> tuple[float, float]:
    """Seconds from creating the tasks to the last completion, and the tasks' summed extract
    time (their child processes)."""
    pg = BenchPostgres().start()
    try:
        _, url = pg.fresh(trace_schema=True)
        with tempfile.TemporaryDirectory() as tmp:
            store = LocalObjectStore(Path(tmp), "http://127.0.0.1:1", b"k" * 32)
            pool = await open_pool(url, min_size=1, max_size=8)
            try:
                queue = MemoryQueue("tasks")
                d = Dispatcher(
                    pool,
                    signer=MemorySigner(),
                    queue=queue,
                    object_store=store,
                    retry=RetryPolicy(max_attempts=3, base_s=0.0),
                )
                ds = Datasets(pool, object_store=store)
                await ds.ensure_dag(ORG, "chain", deployers=["admin"])
                versions = {}
                for name in DATATYPES:
                    await ds.register(
                        ORG, name, dag="chain", job="ingest", update_strategy="append"
                    )
                    versions[name] = await ds.open_version(None, ORG, name)
                await ds.cutover(None, ORG, "chain", versions)
                surface = InProcessTaskSurface(d)
                worker = Worker(
                    surface=surface,
                    queue=queue,
                    operators=dict(BUILTIN_OPERATORS),
                    store=store,
                    wait_s=0.05,
                    concurrency=concurrency,
                )
                stop = asyncio.Event()
                background = asyncio.create_task(d.run_background(stop, reap_every_s=1.0))
                running = asyncio.create_task(worker.run(stop))
                t0 = time.perf_counter()
                infos = await d.create_tasks(
                    [
                        wire.CreateTaskRequest(
                            operator="cryo_ingest",
                            org=ORG,
                            payload={"start": s, "end": min(s + chunk, blocks), "rpc_url": rpc},
                            timeout_s=300,
                        )
                        for s in range(0, blocks, chunk)
                    ]
                )
                pending = {i.task_id for i in infos}
                extract_s = 0.0
                while pending:
                    for task_id in list(pending):
                        task = await d.get_task(task_id)
                        if task["state"] == "failed":
                            raise SystemExit(f"task {task_id} failed: {task['attempts']}")
                        if task["state"] == "completed":
                            pending.discard(task_id)
                            extract_s += task["result"]["extract_s"]
                    await asyncio.sleep(0.02)
                elapsed = time.perf_counter() - t0
                stop.set()
                await asyncio.gather(background, running)
                await surface.close()
                return elapsed, extract_s
            finally:
                await pool.close()
    finally:
        pg.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=3000)
    parser.add_argument("--chunk", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=1)
    args = parser.parse_args()
    node = DevNode.start()
    try:
        rpc = node.rpc()
        make_activity(rpc, min(300, args.blocks))
        mine_empty(rpc, args.blocks + 10 - rpc.block_number())
        bare_s = bare(node.url, args.blocks, args.chunk)
        trace_s, extract_s = asyncio.run(
            through_trace(node.url, args.blocks, args.chunk, args.concurrency)
        )
    finally:
        node.stop()
    print(
        f"ingest benchmark: blocks, transactions and logs of [0, {args.blocks}) "
        f"in ranges of {args.chunk}, worker concurrency {args.concurrency}"
    )
    print(f"{'scenario':<34}{'seconds':>10}{'blocks/s':>12}{'vs bare':>9}")
    for label, secs in (("bare cryo.freeze (one child)", bare_s), ("cryo_ingest", trace_s)):
        print(f"{label:<34}{secs:>10.2f}{args.blocks / secs:>12,.0f}{bare_s / secs:>8.0%}")
    print(f"cryo_ingest's extract children (summed over tasks): {extract_s:.2f} s")


if __name__ == "__main__":
    main()
