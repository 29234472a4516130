"""The chain demo's summary (``trace_servers.demo``, step 5): the published datasets read
through the Query Service, set against the node's own answers for the same blocks.

``summarise`` returns the summary as JSON-able data (``--summary-json`` writes it as is);
``matches_node`` is the demo's verdict. ``print_summary`` shows it on the console.
"""

from __future__ import annotations

import asyncio
from typing import Any

import attrs
from rich.console import Console
from rich.table import Table

from trace_core import errors
from trace_core.access import UserCaller
from trace_lite.chain.devnode import TRANSFER_TOPIC, Rpc
from trace_lite.chain.progress import dag_progress
from trace_lite.datasets import Datasets
from trace_lite.local_store import LocalObjectStore
from trace_lite.query.service import QueryService


@attrs.frozen
class DemoQueries:
    """SQL over an org's datasets through the Query Service, as one of its admins."""

    service: QueryService
    caller: UserCaller
    org: str

    @classmethod
    async def open(
        cls, datasets: Datasets, store: LocalObjectStore, *, data_url: str, org: str, user: str
    ) -> DemoQueries:
        org_id = await datasets.org_id(org)
        caller = UserCaller(user, org_id, frozenset({"admin"}))
        return cls(QueryService(datasets, store, data_url=data_url), caller, org)

    async def query(self, text: str) -> tuple[list[dict[str, Any]], dict[str, str | None]]:
        """The rows of ``text`` (at most 100) by column name, and the versions it read."""
        result = await self.service.query(self.caller, self.org, text, max_rows=100)
        return [dict(zip(result.columns, row, strict=True)) for row in result.rows], result.versions

    async def alert_events(self) -> int:
        """The rows of ``alert_events`` (0 while the sink has stored none: no readable table)."""
        try:
            (row,), _ = await self.query("SELECT count(*) AS events FROM alert_events")
        except errors.TraceError:
            return 0
        return int(row["events"])


async def alert_deliveries(pool: Any, org: str) -> dict[str, int]:
    """The org's alert deliveries by state (none unless a route sends to a destination)."""
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT d.state, count(*) FROM alert_deliveries d JOIN orgs o USING (org_id) "
            "WHERE o.name = %s GROUP BY d.state ORDER BY d.state",
            (org,),
        )
        return {str(state): int(n) for state, n in await cur.fetchall()}


async def summarise(
    pool: Any,
    queries: DemoQueries,
    rpc: Rpc,
    *,
    dag: str,
    history_end: int,
    lags: list[int],
    complete: bool,
) -> dict[str, Any]:
    """The datasets through the Query Service, and the node's answers for the same blocks;
    the alert events raised and their deliveries. ``matches_node`` says whether every count
    matches (and the drain was ``complete``)."""
    (counts,), versions = await queries.query(
        "SELECT (SELECT count(*) FROM monad_blocks) AS blocks, "
        "(SELECT coalesce(max(block_number) + 1, 0) FROM monad_blocks) AS block_end, "
        "(SELECT count(*) FROM monad_transactions) AS transactions, "
        "(SELECT count(*) FROM monad_logs) AS logs, "
        "(SELECT count(*) FROM monad_transfers) AS transfers, "
        "(SELECT count(*) FROM monad_block_stats) AS stats_blocks, "
        "(SELECT coalesce(sum(tx_count), 0) FROM monad_block_stats) AS stats_transactions, "
        "(SELECT coalesce(sum(log_count), 0) FROM monad_block_stats) AS stats_logs",
    )
    samples, _ = await queries.query(
        "SELECT block_number, '0x' || lower(hex(token)) AS token, "
        "'0x' || lower(hex(from_address)) AS from_address, "
        "'0x' || lower(hex(to_address)) AS to_address, value_string AS value "
        "FROM monad_transfers ORDER BY block_number DESC, log_index DESC LIMIT 5",
    )
    end = int(counts["block_end"])
    node = await asyncio.to_thread(node_counts, rpc, end)
    ours = {k: int(counts[k]) for k in ("blocks", "transactions", "logs", "transfers")}
    stats = {k: int(counts[f"stats_{k}"]) for k in ("blocks", "transactions", "logs")}
    progress = await dag_progress(pool, queries.org, dag)
    matches = (
        complete
        and ours == node
        and stats == {k: node[k] for k in stats}
        and ours["blocks"] == end == (progress.cursor or history_end)
    )
    return {
        "org": queries.org,
        "dag": dag,
        "blocks_covered": [0, end],
        "datasets": ours,
        "block_stats": stats,
        "node": node,
        "matches_node": matches,
        "complete": complete,
        "versions": versions,
        "sample_transfers": samples,
        "alerts": {
            "events": await queries.alert_events(),
            "deliveries": await alert_deliveries(pool, queries.org),
        },
        "tasks": {
            "total": progress.tasks,
            "failed": progress.failed,
            "retried": progress.retried,
        },
        "follower_cursor": progress.cursor,
        "backfill_end": history_end,
        "head_lag_blocks": percentiles(lags),
    }


def print_summary(console: Console, summary: dict[str, Any]) -> None:
    """Print ``summary`` (from ``summarise``) as a table and a few lines, ending with the verdict."""
    c = console
    ours, node = summary["datasets"], summary["node"]
    table = Table(
        title=f"Ingested blocks [0, {summary['blocks_covered'][1]}) (Query Service vs node)"
    )
    for col in ("", "datasets", "node", ""):
        table.add_column(col)
    for key in ("blocks", "transactions", "logs", "transfers"):
        ok = "ok" if ours[key] == node[key] else "DIFFERS"
        table.add_row(key, str(ours[key]), str(node[key]), ok)
    stats = summary["block_stats"]
    table.add_row(
        "block stats",
        f"{stats['blocks']} blocks, {stats['transactions']} txs, {stats['logs']} logs",
        "",
        "ok" if stats == {k: node[k] for k in stats} else "DIFFERS",
    )
    c.print(table)
    c.print(
        "head lag while following (blocks behind the node, per progress sample): "
        + ", ".join(f"{k} {v}" for k, v in summary["head_lag_blocks"].items())
    )
    c.print(
        "dataset versions: "
        + ", ".join(f"{k} {str(v)[:8]}" for k, v in sorted(summary["versions"].items()))
    )
    tasks = summary["tasks"]
    c.print(
        f"tasks: {tasks['total']} ({tasks['retried']} retried, {tasks['failed']} failed); follower cursor {summary['follower_cursor']}"
    )
    if summary["sample_transfers"]:
        c.print("latest decoded transfers:")
        for t in summary["sample_transfers"]:
            c.print(
                f"  block {t['block_number']}: token {t['token'][:12]}.. {t['from_address'][:12]}.. -> {t['to_address'][:12]}.. value {t['value']}"
            )
    alerts = summary["alerts"]
    c.print(
        f"alerts: {alerts['events']} alert events (large transfers, gas spikes)"
        + (
            "; deliveries " + ", ".join(f"{k} {v}" for k, v in alerts["deliveries"].items())
            if alerts["deliveries"]
            else "; no destination routes them (examples/alerts/monad/route.yaml adds one)"
        )
    )
    if not summary["complete"]:
        c.print("[yellow]the last ranges did not finish within --drain; counts cover what did[/]")
    c.print(
        "[bold green]demo OK: every count matches the node[/]"
        if summary["matches_node"]
        else "[bold red]demo FAILED: counts differ from the node[/]"
    )
    c.print(
        "next: `./scripts/demo --duration 300` follows longer; `./scripts/demo --synthetic` runs the "
        "task-lifecycle workload; the DAG is examples/monad/monad.yaml (docs/architecture/ingest.md). "
        "While a demo runs, in another shell: `export TRACE_USER_TOKEN=$(.venv/bin/trace users token --sub demo)`, "
        "then `.venv/bin/trace dag status demo monad` and "
        '`.venv/bin/trace query "SELECT count(*) FROM monad_transfers" --org demo` '
        "(`--duration 0` runs until Ctrl-C)."
    )


def percentiles(values: list[int]) -> dict[str, int | None]:
    """p50 and p95 (nearest rank) of ``values``; None when there are none."""
    ordered = sorted(values)
    if not ordered:
        return {"p50": None, "p95": None}
    return {
        f"p{round(q * 100)}": ordered[min(len(ordered) - 1, int(q * len(ordered)))]
        for q in (0.5, 0.95)
    }


def node_counts(rpc: Rpc, end: int) -> dict[str, int]:
    """The node's blocks, transactions, logs and ERC-20 Transfer logs of ``[0, end)``."""
    if end == 0:
        return {"blocks": 0, "transactions": 0, "logs": 0, "transfers": 0}
    txs = sum(
        len(rpc.call("eth_getBlockByNumber", hex(b), False)["transactions"]) for b in range(end)
    )
    logs = rpc.call("eth_getLogs", {"fromBlock": "0x0", "toBlock": hex(end - 1)})
    transfer = "0x" + TRANSFER_TOPIC
    transfers = sum(
        1
        for log in logs
        if len(log["topics"]) == 3 and log["topics"][0] == transfer and len(log["data"]) == 66
    )
    return {"blocks": end, "transactions": txs, "logs": len(logs), "transfers": transfers}


__all__ = [
    "DemoQueries",
    "alert_deliveries",
    "node_counts",
    "percentiles",
    "print_summary",
    "summarise",
]
