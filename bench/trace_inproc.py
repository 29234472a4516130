"""Scenario (a): the Trace kernel driven in-process by trusted claimers.

``Dispatcher(wake_mode="notify")``: ``create_tasks`` in batches (one transaction per batch,
``NOTIFY trace_tasks`` at commit); claimer coroutines (in one or more processes, each with its
own Dispatcher and pool) wake on the notification, call ``claim_next(n)`` (lock with SKIP
LOCKED, kernel decision per row, one unnest UPDATE + attempt-history INSERT) and then
``complete_many([...])`` (lock, kernel decision per row, fenced CAS on
``(task_id, attempt, lease_token)`` + attempt-history UPDATE). Every claim and every completion
is a committed transaction with ``synchronous_commit=on``.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import os
import time
from typing import Any

import psycopg

from bench.common import batches, count, proc_cpu_s, proc_memory_kb, wait_until
from trace_core import wire
from trace_core.testing.memory_signer import MemorySigner
from trace_lite.dispatcher import Dispatcher, open_pool

NOOP = wire.CreateTaskRequest(operator="noop", org="bench", payload={})


async def _dispatcher(url: str, pool_size: int) -> Dispatcher:
    pool = await open_pool(url, min_size=pool_size, max_size=pool_size)
    return Dispatcher(pool, signer=MemorySigner(), wake_mode="notify")


async def _listen(url: str, wake: asyncio.Event, ready: asyncio.Event) -> None:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute("LISTEN trace_tasks")
        ready.set()
        async for _ in conn.notifies():
            wake.set()


async def _claimer(
    d: Dispatcher,
    wake: asyncio.Event,
    stop: asyncio.Event,
    n: int,
    worker_id: str,
    claimed_at: dict[str, float] | None,
    done: list[int],
) -> None:
    while not stop.is_set():
        wake.clear()
        grants = await d.claim_next(n, worker_id)
        if not grants:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), 0.5)
            continue
        if claimed_at is not None:
            now = time.time()
            for g in grants:
                claimed_at[g.task_id] = now
        results = await d.complete_many(
            [
                wire.CompleteRequest(
                    task_id=g.task_id, attempt=g.attempt, lease_token=g.lease_token
                )
                for g in grants
            ]
        )
        bad = [r for r in results if not isinstance(r, wire.CompleteResponse)]
        if bad:
            raise RuntimeError(f"completion refused: {bad[0]!r}")
        done[0] += len(grants)


async def _claimers_main(
    url: str,
    claimers: int,
    claim_batch: int,
    stop_flag: Any,
    ready_flag: Any,
) -> None:
    d = await _dispatcher(url, claimers + 1)
    wake, listening, stop = asyncio.Event(), asyncio.Event(), asyncio.Event()
    listener = asyncio.create_task(_listen(url, wake, listening))
    await listening.wait()
    done = [0]
    tasks = [
        asyncio.create_task(
            _claimer(d, wake, stop, claim_batch, f"bench-{os.getpid()}-{i}", None, done)
        )
        for i in range(claimers)
    ]
    ready_flag.set()
    while not stop_flag.is_set():
        await asyncio.sleep(0.05)
        for t in tasks:
            if t.done() and t.exception():
                raise t.exception()  # type: ignore[misc]
    stop.set()
    wake.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    listener.cancel()
    await asyncio.gather(listener, return_exceptions=True)
    await d.pool.close()


def _child(url: str, claimers: int, claim_batch: int, stop_flag: Any, ready_flag: Any) -> None:
    asyncio.run(_claimers_main(url, claimers, claim_batch, stop_flag, ready_flag))


class ClaimerProcesses:
    """``processes`` child processes, each running ``claimers`` claimer coroutines."""

    def __init__(self, url: str, processes: int, claimers: int, claim_batch: int) -> None:
        ctx = mp.get_context("spawn")
        self.stop_flag = ctx.Event()
        self.ready = [ctx.Event() for _ in range(processes)]
        self.procs = [
            ctx.Process(
                target=_child, args=(url, claimers, claim_batch, self.stop_flag, r), daemon=True
            )
            for r in self.ready
        ]

    async def __aenter__(self) -> ClaimerProcesses:
        for p in self.procs:
            p.start()
        for r, p in zip(self.ready, self.procs, strict=True):
            while not r.is_set():
                if not p.is_alive():
                    raise RuntimeError("a claimer process died while starting")
                await asyncio.sleep(0.02)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop_flag.set()
        for p in self.procs:
            await asyncio.to_thread(p.join, 20)
            if p.is_alive():
                p.kill()

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.pid is not None]


async def _create(d: Dispatcher, n: int, batch: int) -> None:
    for size in batches(n, batch):
        await d.create_tasks([NOOP] * size)


async def throughput(
    url: str,
    n: int,
    *,
    processes: int = 2,
    claimers: int = 2,
    claim_batch: int = 500,
    create_batch: int = 1000,
    prefill: bool = False,
    limit_s: float = 300.0,
) -> dict[str, float]:
    """Jobs/s from the first create to the last completion.

    ``prefill``: create all ``n`` tasks first (a backlog), then start the claimers and time the
    drain alone. Returns ``{"rate", "claimer_rss_kb"}``.
    """
    producer = await _dispatcher(url, 2)
    remaining = await count(url, "SELECT count(*) FROM tasks WHERE state IN ('queued', 'running')")
    try:
        if prefill:
            await _create(producer, n, 5000)
        async with ClaimerProcesses(url, processes, claimers, claim_batch) as procs:
            started = time.monotonic()
            cpu0 = sum(proc_cpu_s(p) for p in procs.pids)
            if not prefill:
                await _create(producer, n, create_batch)
            finished = await wait_until(lambda: _zero(remaining), limit_s=limit_s)
            cpu1 = sum(proc_cpu_s(p) for p in procs.pids)
            rss = max((proc_memory_kb(p).get("VmHWM", 0) for p in procs.pids), default=0)
        return {
            "rate": n / (finished - started),
            "claimer_rss_kb": rss,
            "claimer_cpu_us_per_job": (cpu1 - cpu0) / n * 1e6,
        }
    finally:
        await remaining.conn.close()  # type: ignore[attr-defined]
        await producer.pool.close()


async def _zero(probe: Any) -> bool:
    return await probe() == 0


async def latency(url: str, m: int, *, gap_s: float = 0.005, claimers: int = 2) -> list[float]:
    """Wake-to-claim latency (ms) of ``m`` tasks created one at a time into idle claimers.

    From ``create_tasks`` returning (its transaction committed, NOTIFY sent) to ``claim_next``
    returning the task in a claimer of the same process (same clock).
    """
    d = await _dispatcher(url, claimers + 2)
    wake, listening, stop = asyncio.Event(), asyncio.Event(), asyncio.Event()
    listener = asyncio.create_task(_listen(url, wake, listening))
    await listening.wait()
    claimed_at: dict[str, float] = {}
    committed_at: dict[str, float] = {}
    done = [0]
    tasks = [
        asyncio.create_task(_claimer(d, wake, stop, 10, f"lat-{i}", claimed_at, done))
        for i in range(claimers)
    ]
    try:
        await asyncio.sleep(0.6)  # let claimers go idle (their first poll times out)
        for _ in range(m):
            (info,) = await d.create_tasks([NOOP])
            committed_at[info.task_id] = time.time()
            await asyncio.sleep(gap_s)
        await wait_until(lambda: _true(done[0] >= m), limit_s=30)
    finally:
        stop.set()
        wake.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        listener.cancel()
        await asyncio.gather(listener, return_exceptions=True)
        await d.pool.close()
    return [(claimed_at[t] - committed_at[t]) * 1000 for t in committed_at]


async def _true(x: bool) -> bool:
    return x
