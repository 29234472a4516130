"""``trace demo``: Trace's main job on a live local chain (``./scripts/demo``).

1. Databases: with ``TRACE_DATABASE_URL`` unset, the embedded cluster's own demo databases
   (``trace_demo`` / ``trace_demo_data``), dropped and created again at each run so a new chain
   never meets the last one's data; with it set, those databases as they are.
2. A chain: anvil on loopback (chain id 10143, a block every 0.4 s) with ``--history`` blocks
   of activity mined at once (token transfers, ETH transfers, empty blocks) and one large token
   transfer (``LARGE_TRANSFER``: the example's ``large_transfers`` detector raises an alert
   event for it); or the node at ``--rpc-url``. A thread keeps sending transactions (``devnode.LiveActivity``).
3. Trace Lite: a Dispatcher and workers as supervised children (``trace up``'s), then
   ``examples/monad/monad.yaml`` deployed with its pool slots pointed at the node and its
   follower starting where the history ends, the ``trace sink`` for its buffered dataset, and
   a backfill of the history triggered.
4. Progress (rich) until ``--duration`` seconds passed or Ctrl-C; then the activity stops, the
   node stops mining, and the demo waits (at most ``--drain`` seconds; a second Ctrl-C skips
   it) until the last ranges are ingested, decoded and stored.
5. A summary read through the Query Service (SQL over the published datasets, pinned), set
   against the node's own answers for the same blocks; the exit code says whether they match.
   It counts the ``alert_events`` the detectors raised (the drain also waits for the planted
   transfer's) and, when the org routes them to a destination, its deliveries by state.
   Every child (workers, Dispatcher, sink, anvil) is stopped by PID.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

import attrs
import psycopg
import yaml
from psycopg import sql
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from trace_core import errors
from trace_core.access import UserCaller
from trace_core.dag import OperatorInfo
from trace_lite.chain.devnode import (
    DevNode,
    LiveActivity,
    Rpc,
    RpcError,
    anvil_path,
    make_history,
    wait_receipt,
)
from trace_lite.chain.operators import LITE_OPERATORS
from trace_lite.chain.progress import DagProgress, dag_progress
from trace_lite.config import LiteSettings
from trace_lite.dag_runs import DagRuns
from trace_lite.dags import Dags
from trace_lite.datasets import Datasets
from trace_lite.embedded_pg import EmbeddedPostgres
from trace_lite.local_store import LocalObjectStore
from trace_lite.migrate import migrate
from trace_lite.pg import open_pool
from trace_servers.dag_cli import builtin_operators
from trace_servers.demo_summary import DemoQueries, print_summary, summarise
from trace_servers.lite_processes import wait_ready
from trace_servers.signals import on_stop_signals
from trace_servers.supervisor import Supervisor

ORG = "demo"
USER = "demo"
DAG = "monad"
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "monad" / "monad.yaml"
DEMO_DBS = ("trace_demo", "trace_demo_data")
#: The example's Parquet datasets (the summary reads their promoted partitions).
PARQUET_DATASETS = ("monad_blocks", "monad_transactions", "monad_logs", "monad_transfers")
#: Backfill ranges (the example's ``backfill.config.blocks``) and follower chunks.
BACKFILL_BLOCKS = 100
CHUNK = 20
CONFIRMATIONS = 2


class LiteChildren(Protocol):
    """``trace up``'s supervised Dispatcher and workers (``lite_processes.LiteProcesses``)."""

    supervisor: Supervisor

    def start(self) -> None: ...

    def check(self) -> None: ...

    def stop(self, timeout: float = 40.0) -> None: ...


MakeChildren = Callable[[str, str], LiteChildren]


def demo_databases(settings: LiteSettings) -> tuple[str, str, bool]:
    """``(state_url, data_url, embedded)``: see the module docstring, step 1."""
    if settings.database_url:
        return settings.database_url, settings.data_database_url or settings.database_url, False
    cluster = EmbeddedPostgres(settings.home / "pg").start()
    for name in DEMO_DBS:
        cluster.drop_database(name)
        cluster.create_database(name)
    return cluster.url(DEMO_DBS[0]), cluster.url(DEMO_DBS[1]), True


def example(rpc_url: str, follow_from: int) -> dict[str, Any]:
    """``examples/monad/monad.yaml`` with every slot on ``rpc_url``, the follower starting at
    ``follow_from``, and 100-block windows (the demo's chain is short)."""
    doc: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    for slots in doc["worker_pools"].values():
        for slot in slots:
            slot["env"]["RPC_URL"] = rpc_url
    follow = doc["jobs"]["follow"]["config"]
    follow.update(start=follow_from, chunk=CHUNK, confirmations=CONFIRMATIONS)
    doc["jobs"]["backfill"]["config"]["blocks"] = BACKFILL_BLOCKS
    doc["jobs"]["windows"]["config"]["blocks"] = BACKFILL_BLOCKS
    return doc


#: The planted token transfer's amount: over the example's ``large_transfers`` threshold (10^24).
LARGE_TRANSFER = 5 * 10**24


def plant_large_transfer(rpc: Rpc, token: str) -> int:
    """Mine one ``LARGE_TRANSFER`` of ``token`` (one Transfer log); returns its block number."""
    sender, receiver = rpc.call("eth_accounts")[:2]
    data = "0x" + receiver[2:].rjust(64, "0") + LARGE_TRANSFER.to_bytes(32, "big").hex()
    tx = rpc.call("eth_sendTransaction", {"from": sender, "to": token, "data": data})
    rpc.call("evm_mine")
    return int(wait_receipt(rpc, tx)["blockNumber"], 16)


def _missing_tools(rpc_url: str | None) -> str | None:
    if rpc_url is None:
        try:
            anvil_path()
        except FileNotFoundError as exc:
            return str(exc)
    if importlib.util.find_spec("cryo") is None:
        return "cryo is not installed (the ingest extra: linux x86_64, Python <= 3.12 only)"
    return None


def cmd_chain_demo(settings: LiteSettings, args: argparse.Namespace, children: MakeChildren) -> int:
    """Run the demo (module docstring). Returns 0 when every count matches the node."""
    console = Console(highlight=False)
    if not console.is_terminal:  # a log or a pipe: no wrapping at 80 columns
        console = Console(highlight=False, width=160)
    missing = _missing_tools(args.rpc_url)
    if missing:
        console.print(
            f"cannot run the chain demo: {missing}\n(`./scripts/demo --synthetic` runs without a chain)"
        )
        return 2
    console.print(f"[bold]Trace demo[/]: Trace Lite and a live chain; state in {settings.home}")
    state_url, data_url, embedded = demo_databases(settings)
    console.print(f"postgres: {state_url}")
    migrate(state_url, data_url)
    node: DevNode | None = None
    activity: LiveActivity | None = None
    procs: LiteChildren | None = None
    log_dir = settings.home / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    try:
        if args.rpc_url:
            url = args.rpc_url
        else:
            node = DevNode.start(block_time_s=0.4, log_path=log_dir / "anvil.log")
            url = node.url
        rpc = Rpc(url)
        started = f", anvil pid {node.proc.pid}" if node is not None else ""
        console.print(f"chain: {url} (chain id {int(rpc.call('eth_chainId'), 16)}{started})")
        if args.history > 0:
            made = make_history(rpc, args.history)
            large = plant_large_transfer(rpc, made.contract)
            console.print(
                f"history: {made.txs} transactions, {made.contract_calls} token transfers, "
                f"one large transfer ({LARGE_TRANSFER} base units) in block {large}"
            )
        history_end = rpc.block_number() // BACKFILL_BLOCKS * BACKFILL_BLOCKS
        procs = children(state_url, data_url)
        procs.start()
        wait_ready(settings.dispatcher_url)
        activity = LiveActivity(url).start()
        run = _Run(settings, args, console, state_url, data_url, rpc, history_end, procs, activity)
        return asyncio.run(run.main())
    except KeyboardInterrupt:  # before the run took over Ctrl-C: nothing to summarise yet
        console.print("interrupted while starting")
        return 130
    finally:
        console.print("stopping: activity, workers, dispatcher, sink, node ...")
        if activity is not None:
            activity.stop()
        if procs is not None:
            procs.stop()
        if node is not None:
            node.stop()
        if embedded and not args.keep_postgres:
            EmbeddedPostgres(settings.home / "pg").stop()
        console.print("stopped")


@attrs.define
class _Run:
    settings: LiteSettings
    args: argparse.Namespace
    console: Console
    state_url: str
    data_url: str
    rpc: Rpc
    history_end: int
    procs: LiteChildren
    activity: LiveActivity
    #: Blocks between the node's head and the follower's cursor at each progress sample while
    #: following (the cursor is the next block to announce; a chunk and the confirmations are
    #: part of it by design).
    lags: list[int] = attrs.field(factory=list)
    stop: asyncio.Event = attrs.field(factory=asyncio.Event)
    abort: asyncio.Event = attrs.field(factory=asyncio.Event)

    def _interrupt(self) -> None:
        if self.stop.is_set():
            self.abort.set()
        self.stop.set()

    async def main(self) -> int:
        on_stop_signals(self._interrupt)
        pool = await open_pool(self.state_url, min_size=1, max_size=4)
        try:
            return await self._main(pool)
        finally:
            await pool.close()

    async def _main(self, pool: Any) -> int:
        s = self.settings
        store = LocalObjectStore(s.object_root, s.dispatcher_url, s.object_secret)
        datasets = Datasets(pool, object_store=store)
        await datasets.set_member(None, ORG, USER, ["admin"])
        operators = {
            **builtin_operators(),
            **{n: OperatorInfo(n, d) for n, d in LITE_OPERATORS.items()},
        }
        deployed = await Dags(pool, operators=operators).deploy(
            None, ORG, example(self.rpc.url, self.history_end)
        )
        self.console.print(f"deployed {DAG} (version {deployed.version}) in org {ORG!r}")
        self.procs.supervisor.start("sink", ["sink", "run", "--org", ORG])
        if self.history_end:
            await DagRuns(pool).trigger(
                None, ORG, DAG, "backfill", payload={"start": 0, "end": self.history_end}
            )
        backfill_total = self.history_end // BACKFILL_BLOCKS
        self.console.print(
            f"backfill [0, {self.history_end}) in {backfill_total} ranges over 2 slots; "
            f"following the head from {self.history_end} in {CHUNK}-block ranges "
            f"({CONFIRMATIONS} confirmations); {'Ctrl-C' if self.args.duration <= 0 else f'{self.args.duration:g} s or Ctrl-C'} ends it"
        )
        started = time.monotonic()
        await self._show(
            pool,
            datasets,
            backfill_total,
            until=lambda: (
                self.stop.is_set() or (0 < self.args.duration <= time.monotonic() - started)
            ),
        )
        self.activity.stop()
        self.rpc.call("evm_setIntervalMining", 0)  # freeze the chain: the last ranges settle
        head = self.rpc.block_number()
        last = max(self.history_end, (head - CONFIRMATIONS) // CHUNK * CHUNK)
        self.console.print(f"chain frozen at block {head}; finishing ranges up to {last} ...")
        drain_until = time.monotonic() + self.args.drain

        def drained(p: DagProgress, stored: int) -> bool:
            return (
                (p.cursor or 0) >= last
                # the follower's last ranges are ingested, not merely announced (an announced
                # range has no task until its event fans out: in_flight cannot see it)
                and p.blocks_done >= last
                and p.in_flight == 0
                and p.ranges_done == p.ranges == p.decoded_ranges
                and stored == p.blocks_done
            )

        async def readable() -> bool:
            """Every committed partition is promoted (readers and queries see promoted ones)."""
            org_id = await datasets.org_id(ORG)
            admin = UserCaller(USER, org_id, frozenset({"admin"}))
            try:
                res = await datasets.resolve(admin, ORG, list(PARQUET_DATASETS), pin_ttl_s=0)
            except errors.Unavailable:
                return False  # asked again at the next sample
            return bool(all(d.pending == 0 for d in res.datasets))

        self.stop.clear()
        done = await self._show(
            pool,
            datasets,
            backfill_total,
            until=lambda: self.abort.is_set() or time.monotonic() > drain_until,
            finished=drained,
            readable=readable,
        )
        if self.args.history > 0:  # the planted large transfer's alert event, through the sink
            queries = await self._queries(datasets, store)
            while not (await queries.alert_events() or self.abort.is_set()):
                if time.monotonic() > drain_until:
                    break
                await asyncio.sleep(0.5)
        summary = await summarise(
            pool,
            await self._queries(datasets, store),
            self.rpc,
            dag=DAG,
            history_end=self.history_end,
            lags=self.lags,
            complete=done,
        )
        print_summary(self.console, summary)
        if self.args.summary_json:
            self.args.summary_json.write_text(json.dumps(summary, indent=2, default=str))
        return 0 if summary["matches_node"] else 1

    async def _queries(self, datasets: Datasets, store: LocalObjectStore) -> DemoQueries:
        return await DemoQueries.open(datasets, store, data_url=self.data_url, org=ORG, user=USER)

    async def _stored_stats(self, datasets: Datasets, org_id: str) -> int:
        admin = UserCaller(USER, org_id, frozenset({"admin"}))
        res = await datasets.resolve(
            admin, ORG, ["monad_block_stats"], pin_ttl_s=0, include_objects=False
        )
        table = res.datasets[0].table
        if table is None:
            return 0
        schema, name = table.split(".", 1)
        try:
            async with await psycopg.AsyncConnection.connect(
                self.data_url, autocommit=True
            ) as conn:
                cur = await conn.execute(
                    sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(schema, name))
                )
                row = await cur.fetchone()
        except psycopg.errors.UndefinedTable:
            return 0  # the sink creates it with its first batch
        if row is None:
            return 0
        (count,) = row
        return int(count)

    async def _show(
        self,
        pool: Any,
        datasets: Datasets,
        backfill_total: int,
        *,
        until: Callable[[], bool],
        finished: Callable[[DagProgress, int], bool] | None = None,
        readable: Callable[[], Awaitable[bool]] | None = None,
    ) -> bool:
        """Show progress until ``until()`` or ``finished(progress, stored rows)`` and
        ``readable()``; returns whether they held."""
        org_id = await datasets.org_id(ORG)
        columns = (
            TextColumn("{task.description:<9}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
        )
        tty = self.console.is_terminal
        last_line = 0.0
        with Progress(*columns, console=self.console, disable=not tty, transient=False) as bars:
            backfill = bars.add_task("backfill", total=max(1, backfill_total), info="ranges")
            head_bar = bars.add_task("head", total=1, info="")
            totals = bars.add_task("ingested", total=None, info="")
            while True:
                self.procs.check()  # a child that exited is restarted
                try:
                    p = await dag_progress(pool, ORG, DAG)
                    stored = await self._stored_stats(datasets, org_id)
                    head = await asyncio.to_thread(self.rpc.block_number)
                except (errors.Unavailable, psycopg.OperationalError, RpcError) as exc:
                    # a database restart or a busy node: skip this sample, not the demo
                    self.console.print(f"progress unavailable for a moment: {exc}")
                    if until():
                        return False
                    await asyncio.sleep(1.0)
                    continue
                cursor = p.cursor if p.cursor is not None else self.history_end
                line = (
                    f"{p.blocks_done} blocks in {p.ranges_done}/{p.ranges} ranges, "
                    f"{p.transfers} transfers, {stored} block stats; "
                    f"{p.failed} failed, {p.retried} retried; tx sent {self.activity.sent}"
                )
                bars.update(backfill, completed=p.backfill_done)
                if finished is None and p.cursor is not None:
                    self.lags.append(head - cursor)
                bars.update(
                    head_bar,
                    total=max(1, head),
                    completed=min(cursor, head),
                    info=f"cursor {cursor}, head {head}, lag {head - cursor} blocks",
                )
                bars.update(totals, info=line)
                if not tty and time.monotonic() - last_line >= 5:
                    last_line = time.monotonic()
                    self.console.print(
                        f"backfill {p.backfill_done}/{backfill_total}; cursor {cursor}, head {head}; {line}"
                    )
                if finished is not None and finished(p, stored):
                    if readable is None or await readable():
                        return True
                if until():
                    return False
                await asyncio.sleep(0.5)


__all__ = ["cmd_chain_demo", "demo_databases", "example"]
