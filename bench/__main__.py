"""``python -m bench [--quick] [--runs N] [--only NAME ...]`` -- the Trace benchmark.

Starts a private PostgreSQL cluster under ``<repo>/.trace/bench-pg`` (port 5436; or uses the
server of ``TRACE_BENCH_DATABASE_URL``, an admin URL), gives every run of every scenario a fresh
database, and prints ONE table: Trace (in-process kernel; Dispatcher over HTTP with 1 and 2
worker processes), pgqueuer, procrastinate and a raw SKIP LOCKED loop -- medians of ``--runs``
runs, wake-to-claim p50/p95, and ratios. Then the backlog table (10k vs 100k queued tasks) with
the Dispatcher's memory. The cluster is stopped at the end. Exit 0 unless a scenario crashed.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import math
import platform
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from bench import peers, trace_http, trace_inproc
from bench.common import REPO_ROOT, BenchPostgres, Measurement

PGQUEUER = "pgqueuer (2 proc, batch 500)"
PROCRASTINATE = "procrastinate (2 proc x 10)"
# The peers' scenarios and the module each needs: the ``bench`` extra, which
# ``requirements/dev.lock`` pins and ``scripts/bootstrap.sh`` installs.
PEER_MODULES = {PGQUEUER: "pgqueuer", PROCRASTINATE: "procrastinate"}


def wanted(name: str, only: set[str]) -> bool:
    return not only or any(o in name for o in only)


def missing_peers(only: set[str]) -> list[str]:
    """The peer modules the selected scenarios need and this interpreter cannot import."""
    return [
        module
        for name, module in PEER_MODULES.items()
        if wanted(name, only) and importlib.util.find_spec(module) is None
    ]


def _profile(quick: bool) -> dict[str, Any]:
    if quick:
        return dict(
            runs=1,
            n_inproc=10_000,
            n_peer=10_000,
            n_proc=1_000,
            n_raw=2_000,
            n_http=600,
            lat=40,
            backlog=(2_000, 10_000),
            backlog_window=4.0,
            backlog_runs=1,
        )
    return dict(
        runs=3,
        n_inproc=30_000,
        n_peer=30_000,
        n_proc=3_000,
        n_raw=5_000,
        n_http=1_500,
        lat=150,
        backlog=(10_000, 100_000),
        backlog_window=8.0,
        backlog_runs=2,
    )


class Bench:
    def __init__(self, pg: BenchPostgres, prof: dict[str, Any], only: set[str]) -> None:
        self.pg = pg
        self.p = prof
        self.only = only
        self.rows: list[Measurement] = []
        self.backlog_rows: list[dict[str, Any]] = []

    def want(self, name: str) -> bool:
        return wanted(name, self.only)

    async def fresh(
        self, setup: Callable[[str], Awaitable[None]] | None, trace_schema: bool
    ) -> tuple[str, str]:
        name, url = self.pg.fresh(trace_schema=trace_schema)
        if setup is not None:
            await setup(url)
        return name, url

    async def scenario(
        self,
        name: str,
        kind: str,
        notes: str,
        *,
        rate: Callable[[str], Awaitable[Any]],
        lat: Callable[[str], Awaitable[list[float]]] | None,
        setup: Callable[[str], Awaitable[None]] | None = None,
        trace_schema: bool = False,
    ) -> None:
        if not self.want(name):
            return
        m = Measurement(name, kind, notes=notes)
        print(f"-- {name}", end="", flush=True)
        for _ in range(self.p["runs"]):
            db, url = await self.fresh(setup, trace_schema)
            out = await rate(url)
            r = out["rate"] if isinstance(out, dict) else out
            m.rates.append(r)
            if isinstance(out, dict):
                m.extra.update({k: v for k, v in out.items() if k != "rate"})
            print(f"  {r:,.0f}/s", end="", flush=True)
            if isinstance(out, dict) and "claimer_cpu_us_per_job" in out:
                print(f" (cpu/job {out['claimer_cpu_us_per_job']:,.0f} us)", end="", flush=True)
            if isinstance(out, dict) and "dispatcher_cpu_us_per_job" in out:
                print(
                    f" (cpu/job: dispatcher {out['dispatcher_cpu_us_per_job']:,.0f} us,"
                    f" workers {out['worker_cpu_us_per_job']:,.0f} us)",
                    end="",
                    flush=True,
                )
            self.pg.drop(db)
        if lat is not None:
            db, url = await self.fresh(setup, trace_schema)
            m.latencies_ms = await lat(url)
            self.pg.drop(db)
            print(f"  wake-to-claim p50 {m.pct(0.5):.1f} ms", end="")
        print(flush=True)
        self.rows.append(m)

    async def backlog(
        self, name: str, run: Callable[[str, int], Awaitable[dict[str, float]]], rss_key: str
    ) -> None:
        if not self.want(name):
            return
        for queued in self.p["backlog"]:
            rates: list[float] = []
            rss: list[float] = []
            for _ in range(self.p["backlog_runs"]):
                db, url = self.pg.fresh(trace_schema=True)
                out = await run(url, queued)
                rates.append(out["rate"])
                rss.append(out.get(rss_key, 0))
                self.pg.drop(db)
            row = {
                "scenario": name,
                "queued": queued,
                "rate": _median(rates),
                "rates": rates,
                "mem_kb": max(rss),
                "mem_kind": rss_key,
            }
            print(
                f"-- {name} backlog {queued:,}: {row['rate']:,.0f}/s "
                f"(runs {', '.join(f'{r:,.0f}' for r in rates)}), {rss_key} "
                f"{row['mem_kb'] / 1024:.0f} MiB",
                flush=True,
            )
            self.backlog_rows.append(row)


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    k = len(s) // 2
    return s[k] if len(s) % 2 else (s[k - 1] + s[k]) / 2


def _fmt(x: float, digits: int = 0) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:,.{digits}f}"


def print_table(rows: list[Measurement], backlog_rows: list[dict[str, Any]]) -> str:
    by = {m.name: m for m in rows}
    refs = {
        "pgqueuer": by.get(PGQUEUER),
        "procrastinate": by.get(PROCRASTINATE),
        "raw": by.get("raw SKIP LOCKED loop (1 conn)"),
    }
    head = (
        f"{'scenario':44s} {'jobs/s (median)':>16s} {'runs':>24s} {'p50 ms':>7s} "
        f"{'p95 ms':>7s} {'÷pgqueuer':>10s} {'÷procrast.':>10s} {'÷raw':>7s}"
    )
    lines = [head, "-" * len(head)]
    for m in rows:
        ratios = []
        for ref in refs.values():
            ratios.append(f"{m.rate / ref.rate:.2f}x" if ref and ref.rate else "-")
        runs = ", ".join(f"{r:,.0f}" for r in m.rates)
        lines.append(
            f"{m.name:44s} {_fmt(m.rate):>16s} {runs:>24s} {_fmt(m.pct(0.5), 1):>7s} "
            f"{_fmt(m.pct(0.95), 1):>7s} {ratios[0]:>10s} {ratios[1]:>10s} "
            f"{ratios[2]:>7s}"
        )
    if backlog_rows:
        lines += [
            "",
            f"{'backlog scenario':44s} {'queued':>8s} {'jobs/s (median)':>16s} "
            f"{'memory (max over runs)':>28s}",
        ]
        for b in backlog_rows:
            mem = f"{b['mem_kind']} {b['mem_kb'] / 1024:,.0f} MiB"
            lines.append(f"{b['scenario']:44s} {b['queued']:>8,} {_fmt(b['rate']):>16s} {mem:>28s}")
    text = "\n".join(lines)
    print("\n" + text)
    return text


def targets(rows: list[Measurement]) -> list[str]:
    by = {m.name: m for m in rows}
    out = []
    a = by.get("trace in-process kernel (2 proc x 4 claimers)")
    pgq = by.get(PGQUEUER)
    pro = by.get(PROCRASTINATE)
    if a and pgq:
        out.append(
            f"(a) in-process >= pgqueuer: {a.rate:,.0f} vs {pgq.rate:,.0f} -> "
            f"{'MET' if a.rate >= pgq.rate else 'NOT MET'} ({a.rate / pgq.rate:.2f}x)"
        )
    for key in ("trace dispatcher HTTP, 1 worker proc", "trace dispatcher HTTP, 2 worker procs"):
        b = by.get(key)
        if b and pro:
            out.append(
                f"(b) {key} >= 5x procrastinate: {b.rate:,.0f} vs {5 * pro.rate:,.0f} -> "
                f"{'MET' if b.rate >= 5 * pro.rate else 'NOT MET'} "
                f"({b.rate / pro.rate:.2f}x)"
            )
    for m in rows:
        if m.kind.startswith("trace") and m.latencies_ms:
            p50 = m.pct(0.5)
            out.append(
                f"wake-to-claim p50 <= 10 ms, {m.name}: {p50:.1f} ms -> "
                f"{'MET' if p50 <= 10 else 'NOT MET'}"
            )
    print("\n".join(["", "targets:", *("  " + t for t in out)]))
    return out


async def main_async(args: argparse.Namespace) -> int:
    prof = _profile(args.quick)
    if args.runs:
        prof["runs"] = args.runs
    pg = BenchPostgres().start()
    started = time.monotonic()
    b = Bench(pg, prof, set(args.only or []))
    settings = pg.server_settings()
    print(
        f"postgres {settings.get('server_version')} synchronous_commit="
        f"{settings.get('synchronous_commit')} fsync={settings.get('fsync')}; "
        f"{'quick' if args.quick else 'default'} profile, {prof['runs']} run(s) each"
    )
    try:
        p = prof
        await b.scenario(
            "trace in-process kernel (2 proc x 4 claimers)",
            "trace-inproc",
            "create_tasks x1000; claim_next(500) + complete_many",
            rate=lambda u: trace_inproc.throughput(
                u, p["n_inproc"], processes=2, claimers=4, claim_batch=500
            ),
            lat=lambda u: trace_inproc.latency(u, p["lat"]),
            trace_schema=True,
        )
        await b.scenario(
            "trace in-process kernel (1 proc x 4 claimers)",
            "trace-inproc",
            "create_tasks x1000; claim_next(500) + complete_many",
            rate=lambda u: trace_inproc.throughput(
                u, p["n_inproc"], processes=1, claimers=4, claim_batch=500
            ),
            lat=None,
            trace_schema=True,
        )
        for w in (1, 2):
            await b.scenario(
                f"trace dispatcher HTTP, {w} worker proc{'s' if w > 1 else ''}",
                "trace-http",
                "cli dispatcher + cli worker --concurrency 64; EdDSA tokens",
                rate=lambda u, w=w: trace_http.throughput(u, p["n_http"], workers=w),
                lat=(lambda u: trace_http.latency(u, p["lat"] // 3)) if w == 1 else None,
                trace_schema=True,
            )
        await b.scenario(
            PGQUEUER,
            "peer",
            "psycopg driver",
            rate=lambda u: peers.pgqueuer_throughput(u, p["n_peer"], processes=2, batch=500),
            lat=lambda u: peers.pgqueuer_latency(u, p["lat"]),
            setup=peers.pgqueuer_install,
        )
        await b.scenario(
            PROCRASTINATE,
            "peer",
            "psycopg connector",
            rate=lambda u: peers.procrastinate_throughput(
                u, p["n_proc"], processes=2, concurrency=10
            ),
            lat=lambda u: peers.procrastinate_latency(u, p["lat"] // 3),
            setup=peers.procrastinate_install,
        )
        await b.scenario(
            "raw SKIP LOCKED loop (1 conn)",
            "raw",
            "one job + one commit per statement",
            rate=lambda u: peers.raw_throughput(u, p["n_raw"], processes=1, loops=1),
            lat=None,
            setup=peers.raw_install,
        )
        await b.backlog(
            "trace in-process kernel (2 proc x 4 claimers)",
            lambda u, q: trace_inproc.throughput(
                u, q, processes=2, claimers=4, claim_batch=500, prefill=True
            ),
            "claimer_rss_kb",
        )
        await b.backlog(
            "trace dispatcher HTTP, 2 worker procs",
            lambda u, q: trace_http.backlog(u, q, workers=2, window_s=p["backlog_window"]),
            "hwm_kb",
        )
    finally:
        pg.stop()
    text = print_table(b.rows, b.backlog_rows)
    verdicts = targets(b.rows)
    elapsed = time.monotonic() - started
    print(f"\ntotal {elapsed:.0f} s")
    if args.json:
        with open(args.json, "w") as f:  # noqa: ASYNC230
            json.dump(
                {
                    "date": datetime.now(UTC).isoformat(timespec="seconds"),
                    "host": platform.node(),
                    "python": sys.version.split()[0],
                    "postgres": settings,
                    "profile": prof,
                    "elapsed_s": round(elapsed, 1),
                    "rows": [
                        {
                            "name": m.name,
                            "rate_median": m.rate,
                            "rates": m.rates,
                            "p50_ms": m.pct(0.5),
                            "p95_ms": m.pct(0.95),
                            "notes": m.notes,
                            "extra": m.extra,
                        }
                        for m in b.rows
                    ],
                    "backlog": b.backlog_rows,
                    "targets": verdicts,
                    "table": text,
                },
                f,
                indent=2,
                default=str,
            )
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--quick", action="store_true", help="one short run of each (~1 minute)")
    ap.add_argument("--runs", type=int, default=0, help="runs per scenario (default 3)")
    ap.add_argument("--only", nargs="*", help="substrings of scenario names to run")
    ap.add_argument("--json", help="also write the results as JSON to this file")
    args = ap.parse_args()
    missing = missing_peers(set(args.only or []))
    if missing:
        print(
            f"bench: the peers {', '.join(missing)} are not installed in this interpreter "
            f"({sys.executable}); install them first:\n"
            f"    {sys.executable} -m pip install -e '.[bench]'\n"
            "(`bash scripts/bootstrap.sh` installs the pinned versions into .venv; "
            "or skip the peers with --only NAME ..., e.g. --only trace)",
            file=sys.stderr,
        )
        return 2
    sys.path.insert(0, str(REPO_ROOT))
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
