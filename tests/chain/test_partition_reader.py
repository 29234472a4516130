"""``PgPartitionReader`` (what ``erc20_transfers`` and ``block_stats`` read through on Lite)
on real Postgres: a task reads a committed partition only through its read grants and only
from its running attempt, and a partition committed but not promoted yet is waited for."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from trace_core import errors, wire
from trace_core.dag import OperatorInfo
from trace_core.lifecycle import RetryPolicy
from trace_core.testing import MemoryQueue, MemorySigner
from trace_lite.chain.operators import PgPartitionReader
from trace_lite.dags import Dags
from trace_lite.dataset_gc import DatasetGC
from trace_lite.dispatcher import Dispatcher, open_pool
from trace_lite.local_store import LocalObjectStore
from trace_sdk import BUILTIN_OPERATORS

ORG = "acme"


def dag() -> dict[str, Any]:
    output = {"storage": "object_store", "update_strategy": "append"}
    return {
        "name": "raw",
        "jobs": {
            "extract": {
                "operator": "noop",
                "triggers": [{"type": "manual"}],
                "outputs": [output, output],
            }
        },
        "publish": [
            {"job": "extract", "output": 0, "dataset": "logs"},
            {"job": "extract", "output": 1, "dataset": "secret"},
        ],
    }


@pytest.fixture
async def env(db_url: str, tmp_path: Path) -> AsyncIterator[tuple[Dispatcher, Any]]:
    pool = await open_pool(db_url, min_size=1, max_size=6)
    store = LocalObjectStore(tmp_path / "objects", "http://127.0.0.1:1", b"s" * 32)
    await Dags(pool, operators={n: OperatorInfo(n) for n in BUILTIN_OPERATORS}).deploy(
        None, ORG, dag()
    )
    d = Dispatcher(
        pool,
        signer=MemorySigner(),
        queue=MemoryQueue("tasks"),
        object_store=store,
        retry=RetryPolicy(max_attempts=3, base_s=0.0),
        rand=lambda: 0.5,
    )
    try:
        yield d, store
    finally:
        await pool.close()


async def _commit(d: Dispatcher, store: LocalObjectStore, dataset: str, data: bytes) -> None:
    """Commit ``data`` as partition [0, 10) of ``dataset`` from an admin-API task."""
    (info,) = await d.create_tasks([wire.CreateTaskRequest(operator="noop", org=ORG)])
    claim = await d.claim(info.task_id)
    prefix = (await d.fetch(claim.task_id)).staging_prefix
    obj = await store.put(f"{prefix}out/{dataset}/0_10.parquet", data)
    manifest = [
        {
            "dataset": dataset,
            "object_key": obj.key,
            "size": obj.size,
            "sha256": obj.sha256,
            "partition": {"start": 0, "end": 10},
        }
    ]
    fence = {"task_id": claim.task_id, "attempt": claim.attempt, "lease_token": claim.lease_token}
    req = {**fence, "result": {}, "outputs": manifest}
    await d.complete(wire.structure(req, wire.CompleteRequest))


async def test_a_task_reads_a_partition_through_its_grants_and_running_attempt(
    env: tuple[Dispatcher, LocalObjectStore],
) -> None:
    d, store = env
    await _commit(d, store, "logs", b"logs-bytes")
    await _commit(d, store, "secret", b"secret-bytes")
    reader = PgPartitionReader(d.pool, store, wait_s=0.5)
    (reading,) = await d.create_tasks(
        [wire.CreateTaskRequest(operator="noop", org=ORG, read_datasets=["logs"])]
    )
    claim = await d.claim(reading.task_id)
    # committed, not promoted yet: waited for, then Unavailable (the task retries)
    with pytest.raises(errors.Unavailable):
        await reader.read(reading.task_id, claim.attempt, "logs", 0, 10)
    gc = DatasetGC(d.pool, store)
    while await gc.promote_once():
        pass
    assert await reader.read(reading.task_id, claim.attempt, "logs", 0, 10) == b"logs-bytes"
    # a dataset its grants do not name, whatever exists in the org
    with pytest.raises((errors.NotFound, errors.Forbidden)):
        await reader.read(reading.task_id, claim.attempt, "secret", 0, 10)
    # not the running attempt
    with pytest.raises(errors.LeaseLost):
        await reader.read(reading.task_id, claim.attempt + 1, "logs", 0, 10)
    # a range that was never committed is waited for, then Unavailable
    with pytest.raises(errors.Unavailable):
        await asyncio.wait_for(reader.read(reading.task_id, claim.attempt, "logs", 10, 20), 10)
