"""Alert latency end to end: from an ``alert_events`` commit to the receiver, through the real
processes, and where the time goes.

    .venv/bin/python -m bench.alert_latency [--triggers 40] [--events 5] [--every 0.25]
                                            [--senders 1,2] [--runs 3] [--poll-s 1]

Each run gets fresh state and data databases and starts, as child processes of this one, the
Dispatcher (``trace dispatcher``: the DAG fan-out), one Lite worker (``trace worker``: the
``alert_detector`` and ``alert_route`` operators), ``trace sink run`` for ``alert_events``
(the buffer forwarder and the sink) and ``--senders`` ``trace delivery run`` processes (with
``--poll-s``, the CLI's default 1 s unless told), against a receiver in this process that
answers 200 at once. ``examples/alerts/watch.yaml`` is deployed over HTTP and its ``ops``
destination created over HTTP (pointing at the receiver). One warm-up run goes through first.

The load: ``--triggers`` manual runs of the ``detect`` job over HTTP, one every ``--every``
seconds, each with ``--events`` transfers above the detector's threshold. Each run's detector
publishes its events as one buffered ``alert_events`` batch; the sink commits it into the
dataset's table, the fan-out makes an ``alert_route`` task of the batch's ``rows_committed``
event, the route records one delivery per event and a Delivery Service sends it.

Timestamps, per delivery (all from the one PostgreSQL server's clock, except the receipt; both
run on this machine). The server runs with ``track_commit_timestamp = on`` so that
``pg_xact_commit_timestamp(xmin)`` gives the commit time of rows never updated afterwards:

1. **committed**: the commit of the detector's ``buffer_batches`` row -- the moment the alert
   event is durable in ``alert_events``'s buffer (the latency's start);
2. **sunk**: the commit of the event's row in the dataset's table (data database, the sink);
3. **announced**: the commit of the batch's ``rows_committed`` ``task_events`` row (the sink);
4. **fanned out**: the commit of the route task's ``task_inputs`` row (the fan-out pass);
5. **claimed**: the route task's first ``task_attempts.started_at`` (the claim transaction's
   ``now()``);
6. **routed**: ``alert_deliveries.created_at`` (the route's recording transaction's ``now()``);
7. **leased**: the first ``delivery_attempts.started_at`` (the lease transaction's ``now()``);
8. **received**: the receiver's ``time.time()`` when the webhook arrived.

It prints, per sender count, the median over runs of each run's p50 / p95 of 8 - 1 and the p50
of every step. Not a timed test: numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
import yaml

from bench import cli_procs
from bench.alerts import Receiver
from bench.common import REPO_ROOT, BenchPostgres
from trace_lite.datasets import Datasets
from trace_lite.dispatcher import open_pool
from trace_lite.embedded_pg import EmbeddedPostgres
from trace_lite.migrate import migrate
from trace_lite.users import LocalUserIssuer

ORG = "bench"
USER = "bench-admin"
EXAMPLE = REPO_ROOT / "examples" / "alerts" / "watch.yaml"
WATCHED = "0x" + "ab" * 20
SECRET = "whsec_" + "YmVuY2gtYWxlcnRzLXNpZ25pbmcta2V5LTMyLWJ5dGVzIQ=="
#: This bench's own cluster: it needs ``track_commit_timestamp`` (a restart to change), so it
#: does not share (and restart) the other benches' server.
PG_DIR = REPO_ROOT / ".trace" / "bench-pg-alerts"
PG_PORT = 5437
STEPS = (
    ("sink", "committed", "sunk"),
    ("rows_committed event", "sunk", "announced"),
    ("fan-out", "announced", "fanned_out"),
    ("route: wake-up + claim", "fanned_out", "claimed"),
    ("route: read + record", "claimed", "routed"),
    ("delivery: wait + lease", "routed", "leased"),
    ("delivery: send", "leased", "received"),
)


class LatencyPostgres(BenchPostgres):
    """``BenchPostgres`` on this bench's own cluster, with commit timestamps kept."""

    def __init__(self) -> None:
        super().__init__()
        if self.owned:
            settings = {"track_commit_timestamp": "on"}
            self.cluster = EmbeddedPostgres(PG_DIR, port=PG_PORT, settings=settings)

    def check(self) -> None:
        with psycopg.connect(self.cluster.admin_url()) as conn:
            row = conn.execute("SHOW track_commit_timestamp").fetchone()
        if row is None or row[0] != "on":
            raise SystemExit("this bench needs a server with track_commit_timestamp = on")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Procs:
    """The Trace processes of one run (own sessions, logs in ``home/logs``), stopped by PID."""

    def __init__(self, home: Path, state_url: str, data_url: str) -> None:
        self.home = home
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.procs: list[subprocess.Popen[bytes]] = []
        (home / "logs").mkdir(parents=True, exist_ok=True)
        self.env = cli_procs.cli_env(home, state_url, data_url) | {
            "TRACE_DISPATCHER_URL": self.url,
            "TRACE_DELIVERY_ALLOW": "127.0.0.1/32",
            "PYTHONUNBUFFERED": "1",
        }

    def log(self, name: str) -> Path:
        return self.home / "logs" / f"{name}.log"

    def spawn(self, name: str, *argv: str) -> subprocess.Popen[bytes]:
        with open(self.log(name), "ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "trace_servers.cli", *argv],
                env=self.env,
                cwd=self.home,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.procs.append(proc)
        return proc

    async def wait_log(self, name: str, text: str, limit_s: float = 60) -> None:
        deadline = time.monotonic() + limit_s
        while text not in self.log(name).read_text(errors="replace"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not say {text!r}: see {self.log(name)}")
            await asyncio.sleep(0.05)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def transfers(first: int, n: int) -> list[dict[str, Any]]:
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return [
        {
            "transaction_hash": f"0x{i:064x}",
            "log_index": 0,
            "from_address": "0x" + "01" * 20,
            "to_address": WATCHED,
            "value": "5000000",
            "block_timestamp": now,
        }
        for i in range(first, first + n)
    ]


async def http(
    session: aiohttp.ClientSession, method: str, url: str, body: Any, want: int = 201
) -> Any:
    async with session.request(method, url, json=body) as resp:
        out = await resp.json()
        if resp.status != want:
            raise RuntimeError(f"{method} {url}: {resp.status} {out}")
        return out


async def ready(url: str, limit_s: float = 60) -> None:
    deadline = time.monotonic() + limit_s
    async with aiohttp.ClientSession() as s:
        while True:
            with contextlib.suppress(aiohttp.ClientError):
                async with s.get(f"{url}/readyz") as resp:
                    if resp.status == 200:
                        return
            if time.monotonic() > deadline:
                raise RuntimeError("the Dispatcher never became ready")
            await asyncio.sleep(0.1)


async def one_run(
    pg: LatencyPostgres, home: Path, senders: int, args: argparse.Namespace
) -> dict[str, float]:
    """Start the processes, warm up, run the paced load; the run's latencies (seconds)."""
    _, state_url = pg.fresh(trace_schema=False)
    _, data_url = pg.fresh(trace_schema=False)
    migrate(state_url, data_url)
    pool = await open_pool(state_url, min_size=1, max_size=2)
    await Datasets(pool).set_member(None, ORG, USER, ["admin", "dag_deployer"])
    await pool.close()
    procs = Procs(home, state_url, data_url)
    receiver = await Receiver().start()
    try:
        procs.spawn("dispatcher", "dispatcher")
        await ready(procs.url)
        token = LocalUserIssuer.init(home / ".trace" / "keys").token(USER)
        headers = {"Authorization": f"Bearer {token}"}
        base = f"{procs.url}/v1/orgs/{ORG}"
        async with aiohttp.ClientSession(headers=headers) as s:
            hook = f"http://127.0.0.1:{receiver.port}/hook"
            destination = {"name": "ops", "url": hook, "signing_secret": SECRET}
            await http(s, "POST", f"{base}/alert-destinations", destination)
            await http(s, "POST", f"{base}/dags", {"spec": yaml.safe_load(EXAMPLE.read_text())})
            procs.spawn("sink", "sink", "run", "--org", ORG, "--dataset", "alert_events")
            await procs.wait_log("sink", '"serving"')
            procs.spawn("worker", "worker", "--concurrency", "8")
            for i in range(senders):
                procs.spawn(f"delivery-{i}", "delivery", "run", "--poll-s", str(args.poll_s))
                await procs.wait_log(f"delivery-{i}", '"running"')
            trigger = f"{base}/dags/watch/jobs/detect/trigger"
            # warm-up: one run through every process, not measured
            receiver.expected = 1
            await http(s, "POST", trigger, {"payload": {"rows": transfers(10**9, 1)}})
            async with asyncio.timeout(120):
                await receiver.all_in.wait()
            warm = set(receiver.seen)
            receiver.all_in.clear()
            receiver.expected = 1 + args.triggers * args.events
            started = time.monotonic()
            for i in range(args.triggers):
                await asyncio.sleep(max(0.0, started + i * args.every - time.monotonic()))
                rows = transfers(i * args.events, args.events)
                await http(s, "POST", trigger, {"payload": {"rows": rows}})
            async with asyncio.timeout(600):
                await receiver.all_in.wait()
        seen = {k: v for k, v in receiver.seen.items() if k not in warm}
        return await latencies(state_url, data_url, seen)
    finally:
        procs.stop()
        await receiver.stop()


STATE_STEPS = """
SELECT b.task_id::text, b.batch_key,
       extract(epoch FROM pg_xact_commit_timestamp(b.xmin))::float8 AS committed,
       extract(epoch FROM pg_xact_commit_timestamp(e.xmin))::float8 AS announced,
       extract(epoch FROM pg_xact_commit_timestamp(i.xmin))::float8 AS fanned_out,
       extract(epoch FROM a.started_at)::float8 AS claimed
FROM buffer_batches b
JOIN task_events e ON e.task_id = b.task_id AND e.event_key LIKE 'sink/%%'
                  AND split_part(e.event_key, '/', 3) = b.batch_key
JOIN task_inputs i ON i.producer_task_id = b.task_id AND i.event_key = e.event_key
JOIN task_attempts a ON a.task_id = i.task_id AND a.attempt = 1
"""
DELIVERY_STEPS = """
SELECT d.delivery_key, d.alert_key,
       extract(epoch FROM d.created_at)::float8 AS routed,
       extract(epoch FROM a.started_at)::float8 AS leased
FROM alert_deliveries d JOIN delivery_attempts a ON a.delivery_id = d.delivery_id
WHERE a.attempt = 1
"""


async def latencies(state_url: str, data_url: str, seen: dict[str, float]) -> dict[str, float]:
    """p50 / p95 from commit to receipt and the p50 of every step, over the deliveries
    received in ``seen`` (webhook-id -> receipt time)."""
    async with await psycopg.AsyncConnection.connect(data_url) as conn:
        cur = await conn.execute(
            "SELECT table_schema, table_name FROM information_schema.columns"
            " WHERE column_name = 'alert_key'"
        )
        (schema, table), *_ = await cur.fetchall()
        cur = await conn.execute(
            psycopg.sql.SQL(
                "SELECT alert_key, _task_id::text, _batch_key,"
                " extract(epoch FROM pg_xact_commit_timestamp(xmin))::float8 FROM {}"
            ).format(psycopg.sql.Identifier(schema, table))
        )
        sunk = {r[0]: (r[1], r[2], r[3]) for r in await cur.fetchall()}
    async with await psycopg.AsyncConnection.connect(state_url) as conn:
        cur = await conn.execute(STATE_STEPS)
        batches = {(r[0], r[1]): r[2:] for r in await cur.fetchall()}
        cur = await conn.execute(DELIVERY_STEPS)
        deliveries = await cur.fetchall()
    rows: list[dict[str, float]] = []
    for key, alert, routed, leased in deliveries:
        received = seen.get(f"msg_{key[:32]}")
        if received is None:
            continue  # the warm-up
        task_id, batch_key, sunk_at = sunk[alert]
        committed, announced, fanned_out, claimed = batches[(task_id, batch_key)]
        rows.append(
            {
                "committed": committed,
                "sunk": sunk_at,
                "announced": announced,
                "fanned_out": fanned_out,
                "claimed": claimed,
                "routed": routed,
                "leased": leased,
                "received": received,
            }
        )
    total = sorted(r["received"] - r["committed"] for r in rows)
    out = {"n": float(len(rows)), "p50": pct(total, 0.5), "p95": pct(total, 0.95)}
    for name, a, b in STEPS:
        out[name] = statistics.median(r[b] - r[a] for r in rows)
    return out


def pct(xs: list[float], q: float) -> float:
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


async def main_async(args: argparse.Namespace) -> None:
    pg = LatencyPostgres()
    pg.start()
    pg.check()
    senders = [int(x) for x in args.senders.split(",")]
    results: dict[int, list[dict[str, float]]] = {n: [] for n in senders}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for i in range(args.runs):
                for n in senders if i % 2 == 0 else senders[::-1]:
                    out = await one_run(pg, Path(tmp) / f"run{i}-{n}", n, args)
                    results[n].append(out)
                    print(
                        f"run {i + 1}/{args.runs}, {n} sender(s): {out['n']:.0f} deliveries, "
                        f"p50 {out['p50'] * 1000:.0f} ms, p95 {out['p95'] * 1000:.0f} ms",
                        flush=True,
                    )
        print(
            f"alert latency, alert_events commit -> receiver: {args.triggers} detector runs of "
            f"{args.events} events, one every {args.every} s; delivery --poll-s {args.poll_s}; "
            f"medians of {args.runs} runs (ms)"
        )
        names = ["p50", "p95"] + [name for name, _, _ in STEPS]
        print(f"{'':<36}" + "".join(f"{f'x{n}':>10}" for n in senders))
        for name in names:
            cells = "".join(
                f"{statistics.median(r[name] for r in results[n]) * 1000:>10.0f}" for n in senders
            )
            label = name if name in ("p50", "p95") else f"  step p50: {name}"
            print(f"{label:<36}{cells}")
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        print(f"machine: {os.cpu_count()} cores, load average {load}")
    finally:
        pg.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--triggers", type=int, default=40)
    p.add_argument("--events", type=int, default=5, help="alert events per detector run")
    p.add_argument("--every", type=float, default=0.25, help="seconds between detector runs")
    p.add_argument("--senders", default="1,2", help="Delivery Service processes, e.g. 1,2")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--poll-s", type=float, default=1.0, help="trace delivery run --poll-s")
    asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    main()
