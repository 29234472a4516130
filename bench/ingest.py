"""Ingest benchmark: blocks per second through ``cryo_ingest`` against bare ``cryo.freeze``.

    .venv/bin/python -m bench.ingest [--blocks 8000] [--chunk 2000] [--runs 5] [--slots 1,2,4]

Starts a local anvil node (``scripts/bootstrap.sh`` installs it), makes activity (contract
calls with logs, transfers, empty blocks) and pads the chain with empty blocks up to
``--blocks``. Then, on the same node and range, ``--runs`` rounds of the scenarios
interleaved (each round starts one scenario later, so none always follows the same one):

* bare: one ``cryo.freeze`` of blocks, transactions and logs over ``[0, blocks)`` with
  ``chunk_size = --chunk``, in a child process (as the operator runs it; the child's start is
  counted); Cryo extracts its chunks concurrently in that one process;
* cryo_ingest, one task: one ``cryo_ingest`` task over ``[0, blocks)`` with ``chunk = --chunk``
  through the in-process Dispatcher on a fresh Postgres database: claim, extract (one child,
  one ``freeze`` of all the chunks), row checks, stage one partition per chunk into the
  LocalObjectStore, commit with the completion;
* cryo_ingest, a task per chunk: ``blocks / chunk`` single-chunk tasks created at once, a worker
  running all of them at a time (a child per task);
* backfill over N slots (``--slots``): manual runs of a DAG job whose worker pool has N slots
  (each slot the node's endpoint), the range planned per slot: N tasks of ``blocks / N``
  blocks (whole chunks), each extracting its chunks in one ``freeze``; and, for N below the
  number of chunks, the same pool with a task per chunk (at most N at a time, each holding a
  slot lease taken in its claim).

Prints the medians of each scenario's seconds and blocks/s, and each scenario's median ratio to
the bare run of the same round (issue #11's target: cryo_ingest >= 80% of bare). Not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench.common import BenchPostgres
from trace_core import wire
from trace_core.dag import OperatorInfo
from trace_core.lifecycle import RetryPolicy
from trace_core.testing import MemoryQueue, MemorySigner
from trace_lite.chain.devnode import DevNode, Rpc, make_activity, mine_empty
from trace_lite.dag_runs import DagRuns
from trace_lite.dags import Dags
from trace_lite.datasets import Datasets
from trace_lite.dispatcher import Dispatcher, open_pool
from trace_lite.local_store import LocalObjectStore
from trace_lite.task_surface import InProcessTaskSurface
from trace_sdk import BUILTIN_OPERATORS, Worker

ORG = "bench"
#: Parts of the tasks' time, summed over tasks: from the task's creation to its attempt's
#: start (queue, claim), from the attempt's start to the task's end (the whole operator and the
#: completion's commit), the extract child (start to answer), its start (process, imports,
#: answer: the child's time outside ``run``), Cryo's freeze, the checks of the files (child and
#: worker), and staging them (read, digest, write).
PARTS = ("to claim", "to commit", "extract", "child start", "freeze", "checks", "stage")
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


def cpu_s() -> float:
    """CPU seconds used so far by this process and its reaped children (user + system)."""
    me, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def bare(rpc: str, blocks: int, chunk: int) -> tuple[float, float]:
    """Seconds and CPU seconds of one bare freeze child."""
    with tempfile.TemporaryDirectory() as out:
        req = json.dumps({"rpc": rpc, "blocks": blocks, "chunk": chunk, "out": out})
        t0, c0 = time.perf_counter(), cpu_s()
        subprocess.run([sys.executable, "-c", BARE, req], check=True, capture_output=True)
        return time.perf_counter() - t0, cpu_s() - c0


def _dag(rpc: str, slots: int) -> dict[str, Any]:
    return {
        "name": "backfill",
        "worker_pools": {"rpc": [{"env": {"RPC_URL": rpc}} for _ in range(slots)]},
        "jobs": {
            "ingest": {
                "operator": "cryo_ingest",
                "worker_pool": "rpc",
                "timeout": "5m",
                "triggers": [{"type": "manual"}],
                "outputs": [{"storage": "object_store", "update_strategy": "append"}] * 3,
            }
        },
        "publish": [{"job": "ingest", "output": n, "dataset": d} for n, d in enumerate(DATATYPES)],
    }


async def through_trace(
    pg: BenchPostgres,
    rpc: str,
    tasks: list[tuple[int, int]],
    chunk: int | None,
    slots: int | None,
) -> tuple[float, dict[str, float]]:
    """Seconds from creating the tasks (``[start, end)`` each, in chunks of ``chunk`` blocks;
    None: one chunk each) to the last completion, and the tasks' summed parts (``PARTS``).
    ``slots``: run them as a DAG job on a pool of that many slots; None: plain tasks, all at
    once."""
    _, url = pg.fresh(trace_schema=True)
    extra = {} if chunk is None else {"chunk": chunk}
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
            create: Callable[[], Awaitable[list[str]]]
            if slots is None:
                ds = Datasets(pool, object_store=store)
                await ds.ensure_dag(ORG, "chain", deployers=["admin"])
                versions = {}
                for name in DATATYPES:
                    await ds.register(
                        ORG, name, dag="chain", job="ingest", update_strategy="append"
                    )
                    versions[name] = await ds.open_version(None, ORG, name)
                await ds.cutover(None, ORG, "chain", versions)

                async def create() -> list[str]:
                    infos = await d.create_tasks(
                        [
                            wire.CreateTaskRequest(
                                operator="cryo_ingest",
                                org=ORG,
                                payload={"start": s, "end": e, "rpc_url": rpc, **extra},
                                timeout_s=300,
                            )
                            for s, e in tasks
                        ]
                    )
                    return [i.task_id for i in infos]
            else:
                operators = {n: OperatorInfo(n) for n in BUILTIN_OPERATORS}
                await Dags(pool, operators=operators).deploy(None, ORG, _dag(rpc, slots))
                runs = DagRuns(pool)

                async def create() -> list[str]:
                    return [
                        (await runs.trigger(None, ORG, "backfill", "ingest", payload=p))["task_id"]
                        for p in ({"start": s, "end": e, **extra} for s, e in tasks)
                    ]

            surface = InProcessTaskSurface(d)
            worker = Worker(
                surface=surface,
                queue=queue,
                operators=dict(BUILTIN_OPERATORS),
                store=store,
                wait_s=0.05,
                concurrency=slots or len(tasks),
                retry_after_s=0.05,
            )
            stop = asyncio.Event()
            background = asyncio.create_task(d.run_background(stop, reap_every_s=1.0))
            running = asyncio.create_task(worker.run(stop))
            # a running deployment's Dispatcher already LISTENs for its outbox and its worker
            # is receiving: let both start before the clock does (a task created before the
            # LISTEN waits for the publisher's next poll, about half a second)
            await asyncio.sleep(1.0)
            t0, c0 = time.perf_counter(), cpu_s()
            ids = await create()
            parts = dict.fromkeys(PARTS, 0.0)
            # one query per poll, 20 times a second: the bench's own load stays small
            while True:
                async with pool.connection() as conn:
                    cur = await conn.execute(
                        "SELECT count(*) FILTER (WHERE state = 'completed'), "
                        "count(*) FILTER (WHERE state = 'failed') FROM tasks "
                        "WHERE task_id = ANY(%s::uuid[])",
                        (ids,),
                    )
                    counts = await cur.fetchone()
                assert counts is not None
                completed, failed = counts
                if failed:
                    raise SystemExit(f"a task failed: {ids}")
                if completed == len(ids):
                    break
                await asyncio.sleep(0.05)
            elapsed = time.perf_counter() - t0
            # the worker, the Dispatcher and this loop (one process), and the extract children
            # reaped so far (each is reaped when its extract ends)
            parts["cpu"] = cpu_s() - c0
            async with pool.connection() as conn:
                cur = await conn.execute(
                    "SELECT sum(extract(epoch FROM a.started_at - t.created_at)), "
                    "sum(extract(epoch FROM t.finished_at - a.started_at)) FROM tasks t "
                    "JOIN task_attempts a ON a.task_id = t.task_id AND a.attempt = t.attempt "
                    "WHERE t.task_id = ANY(%s::uuid[])",
                    (ids,),
                )
                spans = await cur.fetchone()
            assert spans is not None
            parts["to claim"], parts["to commit"] = float(spans[0]), float(spans[1])
            for task_id in ids:
                result = (await d.get_task(task_id))["result"]
                child = result["child_s"]
                parts["extract"] += result["extract_s"]
                parts["child start"] += result["extract_s"] - child["run"]
                parts["freeze"] += child["freeze"]
                parts["checks"] += child["check"] + result["check_s"]
                parts["stage"] += result["stage_s"]
            stop.set()
            await asyncio.gather(background, running)
            await surface.close()
            return elapsed, parts
        finally:
            await pool.close()


def per_slot(blocks: int, chunk: int, slots: int) -> list[tuple[int, int]]:
    """``[0, blocks)`` planned over ``slots``: one range of whole chunks per slot."""
    chunks = -(-blocks // chunk)
    size = -(-chunks // slots) * chunk
    return [(s, min(s + size, blocks)) for s in range(0, blocks, size)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=8000)
    parser.add_argument("--chunk", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--slots", default="1,2,4", help="pool sizes of the backfill runs")
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated label parts: run only the scenarios whose label holds one "
        "(e.g. '4 tasks' for the single-chunk ones, which code without tasks of several "
        "chunks also runs)",
    )
    args = parser.parse_args()
    slot_counts = [int(n) for n in args.slots.split(",") if n]
    per_chunk = per_slot(args.blocks, args.chunk, args.blocks)
    n = len(per_chunk)
    # (label, ranges, chunk, slots)
    scenarios: list[tuple[str, list[tuple[int, int]], int | None, int | None]] = [
        (f"cryo_ingest, 1 task of {n} chunks", [(0, args.blocks)], args.chunk, None),
        (f"cryo_ingest, {n} tasks of 1 chunk", per_chunk, None, None),
    ]
    for pool in slot_counts:
        plan = per_slot(args.blocks, args.chunk, pool)
        label = f"backfill, {pool} slot{'s' * (pool > 1)}, {len(plan)} task{'s' * (len(plan) > 1)}"
        scenarios.append((label, plan, args.chunk, pool))
        if len(plan) < n:
            scenarios.append(
                (f"backfill, {pool} slot{'s' * (pool > 1)}, {n} tasks", per_chunk, None, pool)
            )
    if args.only:
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        scenarios = [sc for sc in scenarios if any(w in sc[0] for w in wanted)]
    seconds: dict[str, list[float]] = {"bare cryo.freeze (one child)": []}
    ratios: dict[str, list[float]] = {}
    parts: dict[str, list[dict[str, float]]] = {}
    cpu: dict[str, list[float]] = {"bare cryo.freeze (one child)": []}
    node = DevNode.start()
    pg = BenchPostgres().start()
    try:
        rpc = Rpc(node.url, timeout_s=300)  # mining thousands of blocks on a loaded machine
        make_activity(rpc, min(300, args.blocks))
        mine_empty(rpc, args.blocks + 10 - rpc.block_number())
        for run in range(args.runs):
            # each round starts one scenario later (the bare run included), so no scenario
            # always runs right after the same one
            order: list[int | None] = [None, *range(len(scenarios))]
            shift = run % len(order)
            order = order[shift:] + order[:shift]
            done: dict[str, float] = {}
            for index in order:
                if index is None:
                    bare_s, bare_cpu = bare(node.url, args.blocks, args.chunk)
                    seconds["bare cryo.freeze (one child)"].append(bare_s)
                    cpu["bare cryo.freeze (one child)"].append(bare_cpu)
                    continue
                label, tasks, chunk, slots = scenarios[index]
                secs, summed = asyncio.run(through_trace(pg, node.url, tasks, chunk, slots))
                done[label] = secs
                seconds.setdefault(label, []).append(secs)
                parts.setdefault(label, []).append(summed)
                cpu.setdefault(label, []).append(summed["cpu"])
            for label, secs in done.items():
                ratios.setdefault(label, []).append(bare_s / secs)
            print(
                f"run {run + 1}/{args.runs}: bare {bare_s:.2f}s, "
                + ", ".join(f"{label} {seconds[label][-1]:.2f}s" for label, *_ in scenarios),
                file=sys.stderr,
                flush=True,
            )
    finally:
        pg.stop()
        node.stop()
    print(
        f"ingest benchmark: blocks, transactions and logs of [0, {args.blocks}) in {n} "
        f"chunks of {args.chunk}; medians of {args.runs} interleaved runs; load average "
        + " ".join(f"{x:.1f}" for x in os.getloadavg())
    )
    print(f"{'scenario':<36}{'seconds':>9}{'blocks/s':>10}{'vs bare':>9}{'CPU s':>8}{'vs bare':>9}")
    bare_cpu = statistics.median(cpu["bare cryo.freeze (one child)"])
    for label, runs_s in seconds.items():
        median = statistics.median(runs_s)
        ratio = statistics.median(ratios[label]) if label in ratios else 1.0
        used = statistics.median(cpu[label])
        print(
            f"{label:<36}{median:>9.2f}{args.blocks / median:>10,.0f}{ratio:>9.0%}"
            f"{used:>8.2f}{bare_cpu / used:>9.0%}"
        )
    print("vs bare: median over runs of (bare seconds / scenario seconds) in the same run;")
    print("CPU s: this process and its extract children (not the node, not Postgres), median;")
    print("its vs bare: bare CPU / scenario CPU (medians)")
    print("\nparts of the tasks' time, summed over tasks (medians, seconds):")
    print(f"{'scenario':<36}" + "".join(f"{p:>12}" for p in PARTS))
    for label, rows in parts.items():
        medians = [statistics.median(r[p] for r in rows) for p in PARTS]
        print(f"{label:<36}" + "".join(f"{m:>12.2f}" for m in medians))


if __name__ == "__main__":
    main()
