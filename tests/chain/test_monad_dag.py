"""``examples/monad/monad.yaml`` deployed and run on real Postgres against a real anvil node:
manual triggers run ``cryo_ingest``, its logs events fan out (output 2) to ``range_aggregator``
tasks, whose state is keyed by the DAG job and the logs dataset."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from trace_core.dag import OperatorInfo
from trace_core.lifecycle import RetryPolicy
from trace_core.testing import MemoryQueue, MemorySigner
from trace_lite.chain.devnode import Chain
from trace_lite.dag_runs import DagRuns
from trace_lite.dags import Dags
from trace_lite.dispatcher import Dispatcher, open_pool
from trace_lite.local_store import LocalObjectStore
from trace_lite.operator_state import PgOperatorState
from trace_lite.task_surface import InProcessTaskSurface
from trace_sdk import BUILTIN_OPERATORS, Worker
from trace_sdk.ranges import make_range_aggregator

ORG = "acme"
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "monad" / "monad.yaml"


@pytest.fixture
async def pool(db_url: str) -> AsyncIterator[Any]:
    pool = await open_pool(db_url, min_size=2, max_size=12)
    try:
        yield pool
    finally:
        await pool.close()


def _sql(db_url: str, query: str, params: Any = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(db_url, autocommit=True) as conn:
        return conn.execute(query, params).fetchall()


async def test_the_monad_dag_ingests_and_aggregates_windows(
    pool: Any, db_url: str, tmp_path: Path, chain: Chain
) -> None:
    doc = yaml.safe_load(EXAMPLE.read_text())
    # the endpoint comes from the worker-pool slot the attempt holds, not from the payload
    assert "rpc_url" not in doc["jobs"]["ingest"]["config"]
    doc["worker_pools"]["rpc"][0]["env"]["RPC_URL"] = chain.node.url
    doc["jobs"]["windows"]["config"]["blocks"] = 100
    operators = {n: OperatorInfo(n) for n in [*BUILTIN_OPERATORS, "range_aggregator"]}
    await Dags(pool, operators=operators).deploy(None, ORG, doc)
    store = LocalObjectStore(tmp_path / "objects", "http://127.0.0.1:1", b"s" * 32)
    queue = MemoryQueue("tasks")
    d = Dispatcher(
        pool,
        signer=MemorySigner(),
        queue=queue,
        object_store=store,
        retry=RetryPolicy(max_attempts=3, base_s=0.0),
        rand=lambda: 0.5,
    )
    runs = DagRuns(pool)
    surface = InProcessTaskSurface(d)
    worker = Worker(
        surface=surface,
        queue=queue,
        operators={
            **BUILTIN_OPERATORS,
            "range_aggregator": make_range_aggregator(PgOperatorState(pool)),
        },
        store=store,
        wait_s=0.1,
    )
    stop = asyncio.Event()
    background = asyncio.create_task(d.run_background(stop, reap_every_s=0.05))
    running = asyncio.create_task(worker.run(stop))

    async def windows_after(n: int) -> list[str]:
        """Fan out until ``n`` windows tasks completed; their events, in task order."""
        async with asyncio.timeout(90):
            while True:
                await runs.fan_out_once()
                rows = _sql(
                    db_url,
                    "SELECT t.task_id::text, t.state FROM tasks t WHERE t.dag_job = 'windows' "
                    "ORDER BY t.created_at",
                )
                failed = _sql(
                    db_url, "SELECT dag_job, error::text FROM tasks WHERE state = 'failed'"
                )
                assert not failed, failed
                if len(rows) == n and all(state == "completed" for _, state in rows):
                    break
                await asyncio.sleep(0.05)
        return [
            key
            for (key,) in _sql(
                db_url,
                "SELECT e.event_key FROM task_events e JOIN tasks t USING (task_id) "
                "WHERE t.dag_job = 'windows' ORDER BY t.created_at, e.event_key",
            )
        ]

    try:
        await runs.trigger(None, ORG, "monad", "ingest", payload={"start": 0, "end": 150})
        assert await windows_after(1) == ["window:0_100"]
        await runs.trigger(None, ORG, "monad", "ingest", payload={"start": 150, "end": 300})
        assert await windows_after(2) == ["window:0_100", "window:100_200", "window:200_300"]
    finally:
        stop.set()
        await asyncio.gather(background, running)
        await surface.close()
    # only the logs output feeds the windows job; its state is the DAG job's, per logs dataset
    ((job_key, dataset, state),) = _sql(
        db_url,
        "SELECT s.job_key, d.name, s.state FROM operator_state s "
        "JOIN datasets d ON d.dataset_uuid = s.input_dataset_uuid",
    )
    (dag_id,) = _sql(db_url, "SELECT dag_id::text FROM dags WHERE name = 'monad'")[0]
    assert (job_key, dataset, state["next"]) == (f"{dag_id}/windows", "monad_logs", 300)
