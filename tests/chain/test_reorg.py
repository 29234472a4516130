"""A forced reorg on a real anvil node (``evm_snapshot``, a fork mined, ``evm_revert``, a
different fork mined) under ``examples/monad/monad.yaml`` on real Postgres: the follower sees
the changed hashes, announces exactly the affected range again, ``cryo_ingest`` replaces it
and ``erc20_transfers`` reruns on it once; the published logs and transfers then equal the
node's new chain, and the ranges below the fork are not extracted again."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psycopg
import pyarrow.parquet as pq
import pytest
import yaml

from trace_core.access import UserCaller
from trace_core.dag import OperatorInfo
from trace_core.lifecycle import RetryPolicy
from trace_core.testing import MemoryQueue, MemorySigner
from trace_lite.alert_operators import alert_operators
from trace_lite.chain.devnode import TRANSFER_TOPIC, DevNode, make_activity
from trace_lite.chain.operators import lite_operators
from trace_lite.dag_runs import DagRuns
from trace_lite.dags import Dags
from trace_lite.dataset_gc import DatasetGC
from trace_lite.datasets import Datasets
from trace_lite.dispatcher import Dispatcher, open_pool
from trace_lite.local_store import LocalObjectStore
from trace_lite.outputs import INVALIDATE_TOPIC
from trace_lite.task_surface import InProcessTaskSurface
from trace_sdk import BUILTIN_OPERATORS, Worker
from trace_sdk.follower import reorged_ranges

ORG = "acme"
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "monad" / "monad.yaml"


def _sql(url: str, query: str, params: Any = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(query, params).fetchall()


def test_reorged_ranges_start_at_the_chunk_of_the_lowest_changed_block() -> None:
    remembered = tuple((b, f"h{b}") for b in range(40, 60))
    same = {b: h for b, h in remembered}
    assert reorged_ranges(remembered, same, cursor=60, chunk=20) == ((), False)
    forked = {**same, 47: "x", 52: "y", 59: None}
    assert reorged_ranges(remembered, forked, cursor=60, chunk=20) == (((40, 60),), False)
    deep = {**same, 40: "x"}  # the lowest remembered block: the fork may be below the window
    assert reorged_ranges(remembered, deep, cursor=80, chunk=20) == (((40, 60), (60, 80)), True)


@pytest.fixture
async def pool(db_url: str) -> AsyncIterator[Any]:
    pool = await open_pool(db_url, min_size=2, max_size=12)
    try:
        yield pool
    finally:
        await pool.close()


async def test_a_forced_reorg_replaces_exactly_the_affected_range(
    pool: Any, db_url: str, tmp_path: Path, fresh_node: DevNode
) -> None:
    rpc = fresh_node.rpc()
    make_activity(rpc, 45)  # blocks 0..46
    snapshot = rpc.call("evm_snapshot")
    make_activity(rpc, 30)  # fork A: 47..
    doc: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    for slots in doc["worker_pools"].values():
        for slot in slots:
            slot["env"]["RPC_URL"] = fresh_node.url
    doc["jobs"]["follow"]["triggers"] = [{"type": "manual"}]  # runs when the test says
    doc["jobs"]["follow"]["config"].update(start=0, chunk=20, confirmations=2)
    doc["jobs"]["windows"]["config"]["blocks"] = 100
    store = LocalObjectStore(tmp_path / "objects", "http://127.0.0.1:1", b"s" * 32)
    # with the example's gas_spikes detector (it reads Parquet partitions: no data pool needed)
    lite = lite_operators(pool, store) | alert_operators(pool, pool, store)
    await Datasets(pool, object_store=store).set_member(None, ORG, "alice", ["admin"])
    operators = {n: OperatorInfo(n) for n in [*BUILTIN_OPERATORS, *lite]}
    await Dags(pool, operators=operators).deploy(None, ORG, doc)
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
        surface=surface, queue=queue, operators={**BUILTIN_OPERATORS, **lite}, store=store
    )
    stop = asyncio.Event()
    background = [
        asyncio.create_task(d.run_background(stop, reap_every_s=0.05)),
        asyncio.create_task(worker.run(stop)),
        asyncio.create_task(DatasetGC(pool, store).run_background(stop, every_s=0.1)),
        # fan-out, schedules and invalidation cascades (replace commits announce them)
        asyncio.create_task(runs.run(stop, fan_out_every_s=0.05, schedule_every_s=0.1)),
    ]

    def done(job: str) -> int:
        failed = _sql(db_url, "SELECT dag_job, error::text FROM tasks WHERE state = 'failed'")
        assert not failed, failed
        n = _sql(
            db_url,
            "SELECT count(*) FROM tasks WHERE dag_job = %s AND state = 'completed'",
            (job,),
        )
        return int(n[0][0])

    async def follow(run_id: str, ingest: int, transfers: int) -> list[str]:
        """One follower run; wait until it and ``ingest`` and ``transfers`` tasks completed."""
        started = await runs.trigger(None, ORG, "monad", "follow", run_id=run_id)
        follower = started["task_id"]
        async with asyncio.timeout(90):
            while not (  # noqa: ASYNC110
                (await d.get_task(follower))["state"] == "completed"
                and done("ingest") == ingest
                and done("transfers") == transfers
            ):
                await asyncio.sleep(0.05)
        return [
            key
            for (key,) in _sql(
                db_url,
                "SELECT event_key FROM task_events WHERE task_id = %s ORDER BY seq",
                (started["task_id"],),
            )
        ]

    try:
        assert await follow("one", 3, 3) == ["range:0_20", "range:20_40", "range:40_60"]
        rpc.call("evm_revert", snapshot)
        # fork B, still shorter than what was announced: the follower waits for it to grow
        rpc.call("evm_mine")  # fork B differs from A from block 47 on, in shape too
        assert await follow("waits", 3, 3) == []
        make_activity(rpc, 40)
        assert rpc.block_number() >= 82
        # exactly the range holding the fork again, and the next new one
        assert await follow("two", 5, 5) == ["reorg:40_60", "range:60_80"]
        # the replace commit announced an invalidation; once the cascade consumed it, it has
        # created nothing: the re-extract's own range events already reran the transforms
        async with asyncio.timeout(30):
            while _sql(  # noqa: ASYNC110
                db_url,
                "SELECT count(*) FROM outbox WHERE topic = %s AND state = 'pending'",
                (INVALIDATE_TOPIC,),
            )[0][0]:
                await asyncio.sleep(0.05)
        invalidations = _sql(
            db_url, "SELECT count(*) FROM outbox WHERE topic = %s", (INVALIDATE_TOPIC,)
        )
        assert invalidations[0][0] >= 1
        await asyncio.sleep(0.2)
        assert done("transfers") == 5 and done("ingest") == 5
    finally:
        stop.set()
        await asyncio.gather(*background)
        await surface.close()

    extracted = _sql(
        db_url,
        "SELECT t.result ->> 'start', count(*) FROM tasks t WHERE t.dag_job = 'ingest' GROUP BY 1",
    )
    assert sorted((int(s), n) for s, n in extracted) == [(0, 1), (20, 1), (40, 2), (60, 1)]

    org_id = _sql(db_url, "SELECT org_id::text FROM orgs WHERE name = %s", (ORG,))[0][0]
    admin = UserCaller("alice", org_id, frozenset({"admin"}))
    res = await Datasets(pool, object_store=store).resolve(
        admin, ORG, ["monad_logs", "monad_transfers"], pin_ttl_s=0
    )
    node_logs = rpc.call("eth_getLogs", {"fromBlock": "0x0", "toBlock": hex(79)})
    want_logs = sorted(
        (int(x["blockNumber"], 16), int(x["logIndex"], 16), x["transactionHash"]) for x in node_logs
    )
    want_transfers = sorted(
        (int(x["blockNumber"], 16), int(x["logIndex"], 16))
        for x in node_logs
        if x["topics"][0] == "0x" + TRANSFER_TOPIC and len(x["topics"]) == 3
    )
    for resolved in res.datasets:
        assert sorted((o["start"], o["end"]) for o in resolved.objects) == [
            (0, 20),
            (20, 40),
            (40, 60),
            (60, 80),
        ]
        rows = []
        for obj in resolved.objects:
            rows += pq.read_table(io.BytesIO(await store.get(obj["object_key"]))).to_pylist()
        if resolved.dataset == "monad_logs":
            got = sorted(
                (r["block_number"], r["log_index"], "0x" + r["transaction_hash"].hex())
                for r in rows
            )
            assert got == want_logs
        else:
            assert sorted((r["block_number"], r["log_index"]) for r in rows) == want_transfers
