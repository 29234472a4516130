"""Operators that need Lite's state database, and the reader behind the transforms.

``lite_operators(pool, store)`` is what a Lite worker adds to ``BUILTIN_OPERATORS``: the
operators whose durable state or reads go through the state database directly, because the
task API has no route for them yet -- ``range_aggregator`` and ``chain_follower`` (operator
state, ``trace_lite.operator_state``; the follower also reads what its DAG committed of the
blocks dataset, ``PgCommittedBlocks``) and ``erc20_transfers`` / ``block_stats``
(``trace_sdk.transforms``, reading committed partitions with ``PgPartitionReader``). Each
checks that the calling attempt is its task's running one, as the task API would.
"""

from __future__ import annotations

import asyncio
import time
from typing import NamedTuple

from psycopg_pool import AsyncConnectionPool

from trace_core import errors
from trace_core.access import TaskCaller
from trace_core.ports import ObjectStore
from trace_lite import sqlfile
from trace_lite.datasets import Datasets
from trace_lite.operator_state import PgOperatorState
from trace_lite.pg import fetch_named, transaction
from trace_sdk._worker import Operator
from trace_sdk.follower import CommittedRange, make_head_follower
from trace_sdk.ranges import make_range_aggregator
from trace_sdk.transforms import make_transforms

Q = sqlfile.load("chain.sql")

#: The operators of ``lite_operators`` with one line each (for validating DAG files offline).
LITE_OPERATORS = {
    "range_aggregator": "announces block windows once ordered input ranges cover them",
    "chain_follower": "announces the chain's new confirmed chunks since a durable cursor",
    "erc20_transfers": "decodes one range's ERC-20 Transfer logs into a Parquet partition",
    "block_stats": "publishes per-block tx count, gas used and log count of one range",
}


class _ReaderTask(NamedTuple):
    org_id: str
    org_name: str
    read_datasets: list[str]
    running: bool


class PgPartitionReader:
    """``trace_sdk.transforms.PartitionReader`` on Lite: resolves the dataset as the task
    (``Datasets.resolve`` with the task's read grants from its row: its job's declared inputs),
    picks the promoted object of partition ``[start, end)`` and reads it from the object store.
    A partition committed but not promoted yet is waited for up to ``wait_s`` (promotion runs
    as soon as a completion commits), then ``Unavailable`` (the task retries)."""

    def __init__(
        self, pool: AsyncConnectionPool, store: ObjectStore, *, wait_s: float = 20.0
    ) -> None:
        self.datasets = Datasets(pool, object_store=store)
        self.pool = pool
        self.store = store
        self.wait_s = wait_s

    async def read(self, task_id: str, attempt: int, dataset: str, start: int, end: int) -> bytes:
        async with transaction(self.pool) as cur:
            params = {"task_id": task_id, "attempt": attempt}
            rows = await fetch_named(cur, _ReaderTask, Q["reader_task"], params)
        if not rows:
            raise errors.NotFound("no such task", field="task_id")
        task = rows[0]
        if not task.running:
            raise errors.LeaseLost("the attempt is not the task's running one")
        caller = TaskCaller(task.org_id, task_id, frozenset(task.read_datasets))
        deadline = time.monotonic() + self.wait_s
        while True:
            res = await self.datasets.resolve(caller, task.org_name, [dataset], pin_ttl_s=60)
            try:
                (resolved,) = res.datasets
                for obj in resolved.objects:
                    if obj.get("start") == start and obj.get("end") == end:
                        return await self.store.get(obj["object_key"])
            finally:
                await self.datasets.release_pin(caller, task.org_name, res.pin_id)
            if time.monotonic() > deadline:
                raise errors.Unavailable(
                    f"partition {start}_{end} of {dataset!r} is not readable yet "
                    f"({resolved.pending} committed, not promoted)"
                )
            await asyncio.sleep(0.2)


class _CommittedRow(NamedTuple):
    partition_id: int
    start: int
    end: int
    hashes_sha256: str | None


class PgCommittedBlocks:
    """``trace_sdk.follower.CommittedBlocks`` on Lite: the live partitions of a dataset that the
    follower's own DAG publishes (its active version), with the block-hash digest recorded in
    the blocks range event of the task that committed each. What a DAG committed is its
    own metadata: no dataset is read (the follower declares no inputs)."""

    def __init__(self, pool: AsyncConnectionPool) -> None:
        self.pool = pool

    async def committed(
        self, task_id: str, attempt: int, dataset: str, low: int, high: int
    ) -> list[CommittedRange]:
        async with transaction(self.pool) as cur:
            params = {"task_id": task_id, "attempt": attempt}
            tasks = await fetch_named(cur, _ReaderTask, Q["reader_task"], params)
            if not tasks:
                raise errors.NotFound("no such task", field="task_id")
            if not tasks[0].running:
                raise errors.LeaseLost("the attempt is not the task's running one")
            params = {"task_id": task_id, "dataset": dataset, "low": low, "high": high}
            rows = await fetch_named(cur, _CommittedRow, Q["committed_blocks"], params)
        return [CommittedRange(r.start, r.end, r.partition_id, r.hashes_sha256) for r in rows]


def lite_operators(pool: AsyncConnectionPool, store: ObjectStore) -> dict[str, Operator]:
    """The operators a Lite worker runs over the state database (see the module docstring)."""
    state = PgOperatorState(pool)
    return {
        "range_aggregator": make_range_aggregator(state),
        "chain_follower": make_head_follower(state, PgCommittedBlocks(pool)),
        **make_transforms(PgPartitionReader(pool, store)),
    }


__all__ = ["LITE_OPERATORS", "PgCommittedBlocks", "PgPartitionReader", "lite_operators"]
