"""Progress of a chain DAG like ``examples/monad`` (what ``trace demo`` shows while it runs).

Read straight from the state database: task counts per job (``dag_progress``) and the
follower's durable cursor (``dag_job_state``). Counts only; the demo's summary reads the
published datasets through the Query Service.
"""

from __future__ import annotations

import json
from typing import NamedTuple

from psycopg_pool import AsyncConnectionPool

from trace_lite import sqlfile
from trace_lite.pg import fetch_named, transaction

Q = sqlfile.load("chain.sql")


class DagProgress(NamedTuple):
    """Task counts of the DAG (``dag_progress`` in ``sql/chain.sql``) and the cursor."""

    ranges: int
    ranges_done: int
    blocks_done: int
    backfill_done: int
    decoded_ranges: int
    transfers: int
    in_flight: int
    failed: int
    retried: int
    tasks: int
    #: The follower's cursor (None before its first write).
    cursor: int | None = None


class _StateRow(NamedTuple):
    state: str


async def dag_progress(
    pool: AsyncConnectionPool,
    org: str,
    dag: str,
    *,
    ingest: str = "ingest",
    transfers: str = "transfers",
    follower: str = "follow",
    backfill_input: int = 1,
    background: tuple[str, ...] = ("follow", "windows"),
) -> DagProgress:
    """The progress of ``dag`` in ``org``; job names as in ``examples/monad/monad.yaml``.
    ``background`` jobs do not count as work in flight (the follower runs forever; windows
    may wait for out-of-order ranges)."""
    params = {
        "org": org,
        "dag": dag,
        "ingest": ingest,
        "transfers": transfers,
        "backfill_input": backfill_input,
        "background": list(background),
    }
    async with transaction(pool) as cur:
        (counts,) = await fetch_named(cur, DagProgress, Q["dag_progress"], params)
        rows = await fetch_named(
            cur, _StateRow, Q["dag_job_state"], {"org": org, "dag": dag, "job": follower}
        )
    cursor = json.loads(rows[0].state).get("cursor") if rows else None
    return counts._replace(cursor=cursor)


__all__ = ["DagProgress", "dag_progress"]
