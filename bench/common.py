"""Shared bench plumbing: the PostgreSQL server, fresh databases, timing and statistics."""

from __future__ import annotations

import asyncio
import os
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from trace_lite.embedded_pg import EmbeddedPostgres, ExternalPostgres
from trace_lite.migrate import migrate

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCH_PG_DIR = REPO_ROOT / ".trace" / "bench-pg"
BENCH_PG_PORT = 5436


class BenchPostgres:
    """The bench's server: a private embedded cluster, or ``TRACE_BENCH_DATABASE_URL``."""

    def __init__(self) -> None:
        external = os.environ.get("TRACE_BENCH_DATABASE_URL")
        self.cluster: EmbeddedPostgres | ExternalPostgres
        if external:
            self.cluster = ExternalPostgres(external)
            self.owned = False
        else:
            self.cluster = EmbeddedPostgres(BENCH_PG_DIR, port=BENCH_PG_PORT)
            self.owned = True
        self._dbs: list[str] = []

    def start(self) -> BenchPostgres:
        self.cluster.start()
        return self

    def stop(self) -> None:
        for name in self._dbs:
            self.drop(name)
        if self.owned:
            self.cluster.stop()

    def fresh(self, *, trace_schema: bool) -> tuple[str, str]:
        """A new empty database (migrated for Trace when asked): ``(name, url)``."""
        name = f"bench_{uuid.uuid4().hex[:12]}"
        url = self.cluster.create_database(name)
        self._dbs.append(name)
        if trace_schema:
            migrate(url)
        return name, url

    def drop(self, name: str) -> None:
        try:
            self.cluster.drop_database(name)
        except psycopg.Error:
            pass
        if name in self._dbs:
            self._dbs.remove(name)

    def server_settings(self) -> dict[str, str]:
        with psycopg.connect(self.cluster.admin_url()) as conn:
            rows = conn.execute(
                "SELECT name, setting FROM pg_settings WHERE name IN "
                "('synchronous_commit', 'fsync', 'server_version', 'shared_buffers')"
            ).fetchall()
        return dict(rows)


@dataclass
class Measurement:
    """One scenario's runs: throughput per run, latencies (ms) pooled over runs, extras."""

    name: str
    kind: str  # "trace-inproc" | "trace-http" | "peer" | "raw"
    rates: list[float] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)
    notes: str = ""
    extra: dict[str, float | str] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return statistics.median(self.rates) if self.rates else float("nan")

    def pct(self, q: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        xs = sorted(self.latencies_ms)
        return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


async def wait_until(
    probe: Callable[[], Awaitable[bool]], *, limit_s: float, every: float = 0.01
) -> float:
    """Poll ``probe`` until true; returns the monotonic time it first was. Raises TimeoutError."""
    deadline = time.monotonic() + limit_s
    while True:
        if await probe():
            return time.monotonic()
        if time.monotonic() > deadline:
            raise TimeoutError("the benchmark did not finish in time")
        await asyncio.sleep(every)


async def count(url: str, query: str) -> Callable[[], Awaitable[int]]:
    """A reusable ``SELECT count(*)`` probe on its own autocommit connection."""
    conn = await psycopg.AsyncConnection.connect(url, autocommit=True)

    async def run() -> int:
        cur = await conn.execute(query)
        row = await cur.fetchone()
        return row[0] if row else 0

    run.conn = conn  # type: ignore[attr-defined]
    return run


def proc_memory_kb(pid: int) -> dict[str, int]:
    """VmHWM / VmRSS of a process in KiB (Linux ``/proc/<pid>/status``)."""
    out: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used so far (Linux ``/proc/<pid>/stat``); 0.0
    when it is gone. CPU per job is steadier than jobs/s on a shared machine."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rpartition(")")[2].split()  # after "(comm)": state is field 3
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def batches(n: int, size: int) -> list[int]:
    full, rest = divmod(n, size)
    return [size] * full + ([rest] if rest else [])
