"""Scenario (b): the Dispatcher over HTTP with worker processes, capability tokens included.

The real processes: ``python -m trace_servers.cli dispatcher`` (aiohttp + outbox publisher +
reaper, ``wake_mode="queue"``) and N ``python -m trace_servers.cli worker --concurrency C``.
A task's path: ``POST /internal/admin/tasks`` (batch create + outbox rows) → outbox publisher →
PgQueue (``NOTIFY``) → worker receive → ``POST /internal/task-claim`` (lease + EdDSA capability
token) → ``GET /internal/task-fetch`` → no-op operator → ``POST /v1/task/complete`` (token
verified, fenced on ``(task_id, attempt, lease_token)``) → queue message deleted.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg

from bench import cli_procs
from bench.common import REPO_ROOT, batches, count, proc_cpu_s, proc_memory_kb, wait_until
from trace_core import wire
from trace_core.testing.memory_signer import MemorySigner
from trace_lite.dispatcher import Dispatcher, open_pool
from trace_sdk import DispatcherClient


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Lite:
    """A Dispatcher process and ``workers`` worker processes on database ``url``."""

    def __init__(self, url: str, workers: int, concurrency: int) -> None:
        self.url = url
        self.workers = workers
        self.concurrency = concurrency
        self.home = Path(tempfile.mkdtemp(prefix="trace-bench-"))
        self.port = _free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.token = secrets.token_urlsafe(24)
        self.env = {
            **os.environ,
            "TRACE_HOME": str(self.home),
            "TRACE_DATABASE_URL": url,
            "TRACE_DISPATCHER_URL": self.base_url,
            "TRACE_PLATFORM_TOKEN": self.token,
            "PYTHONPATH": os.pathsep.join(
                [str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
            ),
        }
        self.dispatcher: subprocess.Popen[bytes] | None = None
        self.worker_procs: list[subprocess.Popen[bytes]] = []

    def _spawn(self, name: str, *argv: str) -> subprocess.Popen[bytes]:
        log = open(self.home / f"{name}.log", "ab")
        return subprocess.Popen(
            [sys.executable, "-m", "trace_servers.cli", *argv],
            env=self.env,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )

    async def start_dispatcher(self) -> None:
        self.dispatcher = self._spawn("dispatcher", "dispatcher")
        async with DispatcherClient(
            self.base_url, platform_token=self.token, deadline_s=30
        ) as client:
            await client.request("GET", "/readyz")

    async def start_workers(self) -> None:
        self.worker_procs = [
            self._spawn(f"worker-{i}", "worker", "--concurrency", str(self.concurrency))
            for i in range(self.workers)
        ]
        await asyncio.sleep(1.0)  # imports + first long poll
        for p in self.worker_procs:
            if p.poll() is not None:
                raise RuntimeError(f"a worker exited at start; see {self.home}")

    async def __aenter__(self) -> Lite:
        await self.start_dispatcher()
        await self.start_workers()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        procs = [*self.worker_procs, *([self.dispatcher] if self.dispatcher else [])]
        cli_procs.stop(procs, timeout_s=15)

    def cpu_s(self) -> tuple[float, float]:
        """CPU seconds used so far by the Dispatcher and by all workers together."""
        disp = proc_cpu_s(self.dispatcher.pid) if self.dispatcher else 0.0
        return disp, sum(proc_cpu_s(p.pid) for p in self.worker_procs)

    def dispatcher_memory_kb(self) -> dict[str, int]:
        return proc_memory_kb(self.dispatcher.pid) if self.dispatcher else {}


NOOP = {"operator": "noop", "org": "bench", "payload": {}}
UNFINISHED = "SELECT count(*) FROM tasks WHERE state IN ('queued', 'running', 'pending')"


async def _is_zero(probe: Any) -> bool:
    return await probe() == 0


async def throughput(
    url: str, n: int, *, workers: int, concurrency: int = 64, create_batch: int = 1000
) -> dict[str, float]:
    """Jobs/s from the first HTTP create to the last completion; Dispatcher RSS."""
    left = await count(url, UNFINISHED)
    try:
        async with (
            Lite(url, workers, concurrency) as lite,
            DispatcherClient(lite.base_url, platform_token=lite.token) as client,
        ):
            started = time.monotonic()
            cpu0 = lite.cpu_s()
            for size in batches(n, create_batch):
                await client.create_tasks([NOOP] * size)
            finished = await wait_until(lambda: _is_zero(left), limit_s=120, every=0.05)
            cpu1 = lite.cpu_s()
            mem = lite.dispatcher_memory_kb()
        return {
            "rate": n / (finished - started),
            "dispatcher_cpu_us_per_job": (cpu1[0] - cpu0[0]) / n * 1e6,
            "worker_cpu_us_per_job": (cpu1[1] - cpu0[1]) / n * 1e6,
            "rss_kb": mem.get("VmRSS", 0),
            "hwm_kb": mem.get("VmHWM", 0),
        }
    finally:
        await left.conn.close()  # type: ignore[attr-defined]


async def backlog(
    url: str, queued: int, *, workers: int, concurrency: int = 64, window_s: float = 10.0
) -> dict[str, float]:
    """Throughput over a fixed window with ``queued`` tasks already waiting; Dispatcher RSS.

    The backlog is created in-process (the same ``create_tasks`` the admin route calls, with
    their outbox wake-ups) before the Dispatcher starts.
    """
    pool = await open_pool(url, min_size=1, max_size=2)
    try:
        d = Dispatcher(pool, signer=MemorySigner(), wake_mode="queue")
        req = wire.CreateTaskRequest(operator="noop", org="bench")
        for size in batches(queued, 5000):
            await d.create_tasks([req] * size)
    finally:
        await pool.close()
    done = await count(url, "SELECT count(*) FROM task_attempts WHERE outcome = 'succeeded'")
    try:
        async with Lite(url, workers, concurrency) as lite:
            t0, c0 = time.monotonic(), await done()
            await asyncio.sleep(window_s)
            t1, c1 = time.monotonic(), await done()
            mem = lite.dispatcher_memory_kb()
        return {
            "rate": (c1 - c0) / (t1 - t0),
            "rss_kb": mem.get("VmRSS", 0),
            "hwm_kb": mem.get("VmHWM", 0),
        }
    finally:
        await done.conn.close()  # type: ignore[attr-defined]


async def latency(
    url: str, m: int, *, workers: int = 1, concurrency: int = 8, gap_s: float = 0.01
) -> list[float]:
    """Wake-to-claim (ms): from the create call returning to the claim transaction's ``now()``.

    Same host, same clock. Tasks are created one at a time into idle workers.
    """
    committed: dict[str, float] = {}
    async with (
        Lite(url, workers, concurrency) as lite,
        DispatcherClient(lite.base_url, platform_token=lite.token) as client,
    ):
        await asyncio.sleep(0.5)
        for _ in range(m):
            (info,) = await client.create_tasks([NOOP])
            committed[info["task_id"]] = time.time()
            await asyncio.sleep(gap_s)
        left = await count(url, UNFINISHED)
        try:
            await wait_until(lambda: _is_zero(left), limit_s=60, every=0.05)
        finally:
            await left.conn.close()  # type: ignore[attr-defined]
    async with await psycopg.AsyncConnection.connect(url) as conn:
        cur = await conn.execute(
            "SELECT task_id::text, extract(epoch FROM started_at) FROM task_attempts "
            "WHERE attempt = 1"
        )
        started = {t: float(s) for t, s in await cur.fetchall()}
    return [(started[t] - committed[t]) * 1000 for t in committed if t in started]
