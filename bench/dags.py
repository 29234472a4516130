"""DAG benchmarks: event fan-out, and deploy diff + cutover latency.

    .venv/bin/python -m bench.dags [--runs 3] [--events 10000] [--consumers 999]

* fan-out of one event to ``--consumers`` consuming jobs, and of ``--events`` events to one
  consuming job: tasks created per second by ``DagRuns.fan_out_until_idle`` (passes of up to
  2,000 events until none is left, as the Dispatcher runs them: plan, ``where``, idempotent insert with read grants,
  lineage, wake-ups, announcements consumed, each pass committed), next to a raw baseline in
  the same run on the same Postgres: one ``INSERT ... SELECT`` of the same tasks (same columns
  and payload size), committed, with nothing else;
* deploy latency of a 100-job DAG: a materialization-affecting edit (diff, a staged version
  and pointer set, the replay) and the cutover that makes it live, and an execution-only edit
  (diff, a version live at once) -- p50 and p95 over ``--deploys`` deploys.

Each run gets a fresh database; the table shows medians of ``--runs`` runs and ratios (raw
time / Trace time: 1.0 means as fast as the bare insert), and the CPU per task of each side
(Postgres's backends read from ``/proc``, plus this process's for Trace): on a loaded machine
the rates move with the neighbours' load, the CPU much less. No target is asserted here (targets:
fan-out >= 0.5 of raw; deploy diff + cutover p50 < 200 ms, ``docs/performance.md``).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import statistics
import time
from typing import Any

import psycopg

from bench.common import BenchPostgres
from trace_core import wire
from trace_core.testing import MemoryObjectStore, MemoryQueue, MemorySigner
from trace_lite.dag_remat import DagRemat
from trace_lite.dag_runs import DagRuns
from trace_lite.dags import Dags
from trace_lite.dispatcher import Dispatcher, open_pool
from trace_servers.dag_cli import builtin_operators

ORG = "bench"
OUT = {"storage": "object_store", "update_strategy": "append"}

#: The raw baseline: the same tasks, one statement, nothing else.
RAW_INSERT = """
INSERT INTO tasks (task_id, org_id, operator, payload, state, max_attempts, timeout_s,
                   idempotency_key, runtime, dag_id, dag_version, dag_job, read_datasets)
SELECT gen_random_uuid(), g.org_id, j.operator,
       j.config || jsonb_build_object('event', jsonb_build_object(
           'producer_task_id', e.task_id::text, 'key', e.event_key, 'type', e.event_type,
           'payload', e.payload, 'output', 0, 'input', 0)),
       'queued', j.max_attempts, j.timeout_s,
       'raw:' || e.seq || ':' || j.job, j.runtime, g.dag_id, j.version, j.job, '{}'
FROM task_events e
JOIN tasks p ON p.task_id = e.task_id
JOIN dags g ON g.dag_id = p.dag_id
JOIN dag_inputs i ON i.dag_id = g.dag_id AND i.version = g.active_version
                 AND i.from_job = p.dag_job
JOIN dag_jobs j ON (j.dag_id, j.version, j.job) = (i.dag_id, i.version, i.job)
WHERE e.task_id = %s
"""


def fan_dag(name: str, consumers: int) -> dict[str, Any]:
    jobs: dict[str, Any] = {
        "src": {"operator": "noop", "triggers": [{"type": "manual"}], "outputs": [OUT]}
    }
    for i in range(consumers):
        jobs[f"c{i:04d}"] = {"operator": "noop", "inputs": [{"from": {"job": "src"}}]}
    return {"name": name, "jobs": jobs}


def chain_dag(name: str, length: int, rule: int, timeout: int) -> dict[str, Any]:
    """``length`` jobs in a chain; ``rule`` is the config of the middle job (a
    materialization-affecting field), ``timeout`` the last one's (execution-only)."""
    jobs: dict[str, Any] = {
        "j000": {"operator": "noop", "triggers": [{"type": "manual"}], "outputs": [OUT]}
    }
    for i in range(1, length):
        job: dict[str, Any] = {
            "operator": "noop",
            "inputs": [{"from": {"job": f"j{i - 1:03d}"}}],
            "outputs": [OUT],
        }
        if i == length // 2:
            job["config"] = {"rule": rule}
        if i == length - 1:
            job["timeout"] = timeout
        jobs[f"j{i:03d}"] = job
    publish = [{"job": f"j{i:03d}", "output": 0, "dataset": f"d{i:03d}"} for i in range(length)]
    return {"name": name, "jobs": jobs, "publish": publish}


async def _source_events(d: Dispatcher, runs: DagRuns, dag: str, n: int) -> str:
    """Trigger ``src`` of ``dag`` and complete it having emitted ``n`` events."""
    out = await runs.trigger(None, ORG, dag, "src")
    c = await d.claim(out["task_id"])
    fence = {"task_id": c.task_id, "attempt": c.attempt, "lease_token": c.lease_token}
    for lo in range(0, n - 1, 1000):
        events = [
            wire.EventIn(key=f"e{i}", type="range", payload={"start": i * 10, "end": i * 10 + 10})
            for i in range(lo, min(lo + 1000, n - 1))
        ]
        await d.emit_events(wire.EventsRequest(**fence, events=events))
    final = [wire.EventIn(key="done", type="done", payload={"n": n})]
    await d.complete(wire.CompleteRequest(**fence, final_events=final))
    return str(out["task_id"])


def _backend_cpu_s(url: str) -> float | None:
    """CPU seconds (user + system) the database's other backends have used so far: read from
    ``/proc`` (Linux, the server on this machine); None when it cannot be read."""
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT pid FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            ).fetchall()
        ticks = 0
        for (pid,) in rows:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])
        return ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, psycopg.Error):
        return None


async def _fan_out(url: str, events: int, consumers: int) -> tuple[int, float, float, float, float]:
    """``(tasks, trace_s, raw_s, trace_cpu_s, raw_cpu_s)`` for ``events`` events to
    ``consumers`` jobs; the CPU figures are Postgres's plus (for Trace) this process's, NaN
    when the server's processes cannot be read."""
    pool = await open_pool(url, min_size=2, max_size=8)
    try:
        d = Dispatcher(
            pool, signer=MemorySigner(), queue=MemoryQueue("q"), object_store=MemoryObjectStore()
        )
        dags, runs = Dags(pool, operators=builtin_operators()), DagRuns(pool)
        name = f"fan_{events}_{consumers}"
        await dags.deploy(None, ORG, fan_dag(name, consumers))
        src = await _source_events(d, runs, name, events)
        cpu0, py0 = _backend_cpu_s(url), time.process_time()
        t0 = time.perf_counter()
        created = (await runs.fan_out_until_idle()).created
        trace_s = time.perf_counter() - t0
        py1, cpu1 = time.process_time(), _backend_cpu_s(url)
        t0 = time.perf_counter()
        async with pool.connection() as conn, conn.transaction():
            cur = await conn.execute(RAW_INSERT, (src,))
            inserted = cur.rowcount
        raw_s = time.perf_counter() - t0  # committed, as each of Trace's passes is
        assert inserted == created, (inserted, created)
        cpu2 = _backend_cpu_s(url)
        if cpu0 is None or cpu1 is None or cpu2 is None:
            return created, trace_s, raw_s, math.nan, math.nan
        return created, trace_s, raw_s, cpu1 - cpu0 + py1 - py0, cpu2 - cpu1
    finally:
        await pool.close()


async def _deploys(url: str, jobs: int, deploys: int) -> dict[str, list[float]]:
    pool = await open_pool(url, min_size=2, max_size=8)
    try:
        dags, remat = Dags(pool, operators=builtin_operators()), DagRemat(pool)
        name = "chain"
        await dags.deploy(None, ORG, chain_dag(name, jobs, rule=0, timeout=60))
        out: dict[str, list[float]] = {"staged deploy": [], "cutover": [], "execution-only": []}
        for i in range(1, deploys + 1):
            t0 = time.perf_counter()
            staged = await dags.deploy(None, ORG, chain_dag(name, jobs, rule=i, timeout=60))
            t1 = time.perf_counter()
            (cut,) = await remat.cutover_once()
            t2 = time.perf_counter()
            assert staged.staged_version == cut.version
            live = await dags.deploy(None, ORG, chain_dag(name, jobs, rule=i, timeout=61 + i % 2))
            t3 = time.perf_counter()
            assert live.staged_version is None and live.created
            out["staged deploy"].append(t1 - t0)
            out["cutover"].append(t2 - t1)
            out["execution-only"].append(t3 - t2)
        return out
    finally:
        await pool.close()


def _p(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(len(values) * q))]


async def main_async(args: argparse.Namespace) -> None:
    pg = BenchPostgres().start()
    try:
        print("fan-out: tasks created per second (median of runs; raw = one INSERT ... SELECT);")
        print("CPU per task, µs: Postgres + this process for Trace, Postgres for raw (steadier")
        print("than the rates on a loaded machine; ratio = raw CPU / Trace CPU)")
        print(
            f"{'case':<28} {'tasks':>7} {'trace/s':>10} {'raw/s':>11} {'ratio':>7}"
            f" {'cpu µs':>8} {'raw µs':>8} {'ratio':>7}"
        )
        for events, consumers in ((1, args.consumers), (args.events, 1)):
            rows = []
            for _ in range(args.runs):
                db, url = pg.fresh(trace_schema=True)
                rows.append(await _fan_out(url, events, consumers))
                pg.drop(db)
            tasks = rows[0][0]
            trace_rate = statistics.median(n / t for n, t, *_ in rows)
            raw_rate = statistics.median(n / r for n, _, r, *_ in rows)
            trace_cpu = statistics.median(c for *_, c, _ in rows) / tasks * 1e6
            raw_cpu = statistics.median(c for *_, c in rows) / tasks * 1e6
            label = f"{events} event(s) x {consumers} job(s)"
            print(
                f"{label:<28} {tasks:>7} {trace_rate:>10,.0f} {raw_rate:>11,.0f} "
                f"{trace_rate / raw_rate:>7.2f} {trace_cpu:>8.1f} {raw_cpu:>8.1f} "
                f"{raw_cpu / trace_cpu:>7.2f}"
            )
        print(f"\ndeploy of a {args.jobs}-job DAG, ms (p50 / p95 over {args.deploys} deploys;")
        print("median of runs): a materialization edit staged, its cutover, an execution edit")
        results: dict[str, list[tuple[float, float]]] = {}
        for _ in range(args.runs):
            db, url = pg.fresh(trace_schema=True)
            for k, v in (await _deploys(url, args.jobs, args.deploys)).items():
                results.setdefault(k, []).append((_p(v, 0.5), _p(v, 0.95)))
            pg.drop(db)
        for k, v in results.items():
            p50 = statistics.median(a for a, _ in v) * 1000
            p95 = statistics.median(b for _, b in v) * 1000
            print(f"{k:<28} {p50:>8.1f} / {p95:>8.1f}")
        staged = statistics.median(a for a, _ in results["staged deploy"])
        cut = statistics.median(a for a, _ in results["cutover"])
        print(f"{'diff + cutover (p50 sum)':<28} {(staged + cut) * 1000:>8.1f}")
    finally:
        pg.stop()


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.dags")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--events", type=int, default=10_000)
    ap.add_argument("--consumers", type=int, default=999)
    ap.add_argument("--jobs", type=int, default=100)
    ap.add_argument("--deploys", type=int, default=10)
    asyncio.run(main_async(ap.parse_args()))


if __name__ == "__main__":
    main()
