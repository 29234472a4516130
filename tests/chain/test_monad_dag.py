"""``examples/monad/monad.yaml`` deployed and run on real Postgres (state and data databases)
against a real anvil node: a manual ``backfill`` is split into ranges, each range runs
``cryo_ingest`` through a pool slot, its logs fan out to ``windows`` (``range_aggregator``),
``transfers`` (``erc20_transfers``, Parquet) and ``block_stats`` (buffered Postgres, through the
buffer forwarder and the Sink). Every count is checked against the node's own answers."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import psycopg
import pyarrow.parquet as pq
import pytest
import yaml

from trace_core.access import UserCaller
from trace_core.dag import OperatorInfo
from trace_core.lifecycle import RetryPolicy
from trace_core.testing import MemoryQueue, MemorySigner
from trace_lite.alert_operators import alert_operators
from trace_lite.buffer_forwarder import BufferForwarder, queue_name, topic
from trace_lite.chain.devnode import TRANSFER_TOPIC, Chain
from trace_lite.chain.operators import lite_operators
from trace_lite.dag_runs import DagRuns
from trace_lite.dags import Dags
from trace_lite.dataset_gc import DatasetGC
from trace_lite.datasets import Datasets, table_name
from trace_lite.dispatcher import Dispatcher, open_pool
from trace_lite.local_store import LocalObjectStore
from trace_lite.pg_queue import PgQueue
from trace_lite.sink import Sink, load_dataset
from trace_lite.task_surface import InProcessTaskSurface
from trace_sdk import BUILTIN_OPERATORS, Worker

ORG = "acme"
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "monad" / "monad.yaml"
END = 300  # the backfill's range [0, END)


def _sql(url: str, query: str, params: Any = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(query, params).fetchall()


@attrs.define
class Stack:
    db_url: str
    data_url: str
    state: Any
    data: Any
    store: LocalObjectStore

    def done(self, job: str) -> int:
        failed = _sql(self.db_url, "SELECT dag_job, error::text FROM tasks WHERE state='failed'")
        assert not failed, failed
        ((n,),) = _sql(
            self.db_url,
            "SELECT count(*) FROM tasks WHERE dag_job = %s AND state = 'completed'",
            (job,),
        )
        return int(n)

    async def objects(self, dataset: str) -> list[dict[str, Any]]:
        org_id = _sql(self.db_url, "SELECT org_id::text FROM orgs WHERE name = %s", (ORG,))[0][0]
        admin = UserCaller("alice", org_id, frozenset({"admin"}))
        res = await Datasets(self.state, object_store=self.store).resolve(
            admin, ORG, [dataset], pin_ttl_s=0
        )
        return res.datasets[0].objects


@pytest.fixture
async def stack(db_url: str, data_db_url: str, tmp_path: Path) -> AsyncIterator[Stack]:
    state = await open_pool(db_url, min_size=2, max_size=12)
    data = await open_pool(data_db_url, min_size=1, max_size=4)
    store = LocalObjectStore(tmp_path / "objects", "http://127.0.0.1:1", b"s" * 32)
    try:
        yield Stack(db_url, data_db_url, state, data, store)
    finally:
        await data.close()
        await state.close()


def example(url: str) -> dict[str, Any]:
    """The example with every pool slot pointed at ``url`` and 100-block windows."""
    doc: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    # the endpoint comes from the worker-pool slot the attempt holds, not from the payload
    assert "rpc_url" not in doc["jobs"]["ingest"]["config"]
    for slots in doc["worker_pools"].values():
        for slot in slots:
            slot["env"]["RPC_URL"] = url
    doc["jobs"]["windows"]["config"]["blocks"] = 100
    doc["jobs"]["follow"]["config"]["start"] = END  # the follower takes over after the backfill
    return doc


async def test_the_monad_dag_backfills_and_its_datasets_match_the_node(
    stack: Stack, chain: Chain
) -> None:
    assert chain.head >= END
    pool, store = stack.state, stack.store
    lite = lite_operators(pool, store) | alert_operators(pool, stack.data, store)
    operators = {n: OperatorInfo(n) for n in [*BUILTIN_OPERATORS, *lite]}
    await Datasets(pool, object_store=store).set_member(None, ORG, "alice", ["admin"])
    await Dags(pool, operators=operators).deploy(None, ORG, example(chain.node.url))
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
        operators={**BUILTIN_OPERATORS, **lite},
        store=store,
        wait_s=0.05,
    )
    stats = await load_dataset(pool, ORG, "monad_block_stats")
    stats_queue = PgQueue(pool, queue_name(stats.dataset_uuid), max_receives=5)
    forwarder = BufferForwarder(pool, lambda _: stats_queue, topics=[topic("monad_block_stats")])
    sink = Sink(
        state_pool=pool,
        data_pool=stack.data,
        object_store=store,
        queue=stats_queue,
        org=ORG,
        dataset="monad_block_stats",
    )
    gc = DatasetGC(pool, store)
    stop = asyncio.Event()
    background = asyncio.create_task(d.run_background(stop, reap_every_s=0.05))
    running = asyncio.create_task(worker.run(stop))
    promoting = asyncio.create_task(gc.run_background(stop, every_s=0.1))
    ranges = END // 100

    (version,) = _sql(
        stack.db_url,
        "SELECT v.dataset_version::text FROM dataset_versions v JOIN datasets d "
        "USING (dataset_uuid) WHERE d.name = 'monad_block_stats'",
    )[0]
    stats_table = table_name(version)

    def stored() -> int:
        try:
            return int(_sql(stack.data_url, f"SELECT count(*) FROM {stats_table}")[0][0])
        except psycopg.errors.UndefinedTable:
            return 0

    def settled() -> bool:
        return (
            stack.done("windows") == ranges
            and stack.done("transfers") == ranges
            and stack.done("block_stats") == 2 * ranges  # the transactions event, the logs event
            and stored() == END
        )

    try:
        await runs.trigger(None, ORG, "monad", "backfill", payload={"start": 0, "end": END})
        async with asyncio.timeout(120):
            while not settled():
                await runs.fan_out_once()
                await forwarder.drain()
                await sink.process_once(max_messages=10)
                await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.gather(background, running, promoting)
        await surface.close()

    # the backfill's ranges ran through both slots of the rpc pool (ranges = tasks), one
    # range per slot at a time (the 3 tasks were woken at once)
    assert stack.done("ingest") == ranges
    slots = _sql(stack.db_url, "SELECT slot FROM pool_slot_leases WHERE pool = 'rpc' ORDER BY 1")
    assert [s for (s,) in slots] == [0, 1]
    windows = _sql(
        stack.db_url,
        "SELECT e.event_key FROM task_events e JOIN tasks t USING (task_id) "
        "WHERE t.dag_job = 'windows' ORDER BY e.event_key",
    )
    assert [w for (w,) in windows] == ["window:0_100", "window:100_200", "window:200_300"]

    # transfers: exactly the node's ERC-20 Transfer logs (three topics) of [0, END)
    node_logs = chain.rpc.call(
        "eth_getLogs",
        {"fromBlock": "0x0", "toBlock": hex(END - 1), "topics": ["0x" + TRANSFER_TOPIC]},
    )
    expected = sorted(
        (int(log["blockNumber"], 16), int(log["logIndex"], 16), int(log["data"], 16))
        for log in node_logs
        if len(log["topics"]) == 3
    )
    assert len(expected) == chain.activity.contract_calls > 0
    objects = await stack.objects("monad_transfers")
    assert sorted((o["start"], o["end"]) for o in objects) == [(0, 100), (100, 200), (200, 300)]
    rows = []
    for obj in objects:
        table = pq.read_table(io.BytesIO(await store.get(obj["object_key"])))
        rows += table.to_pylist()
    assert sorted((r["block_number"], r["log_index"], int(r["value_string"])) for r in rows) == (
        expected
    )
    sample = next(r for r in rows if r["block_number"] == expected[0][0])
    first = next(log for log in node_logs if int(log["blockNumber"], 16) == expected[0][0])
    assert "0x" + sample["to_address"].hex() == "0x" + first["topics"][2][-40:]
    assert "0x" + sample["from_address"].hex() == "0x" + first["topics"][1][-40:]

    # block stats: one row per block, tx and log counts and gas as the node says
    got = _sql(
        stack.data_url,
        f"SELECT block_number, tx_count, gas_used, log_count FROM {stats_table} "
        "ORDER BY block_number",
    )
    all_logs = chain.rpc.call("eth_getLogs", {"fromBlock": "0x0", "toBlock": hex(END - 1)})
    want = []
    for b in range(END):
        block = chain.rpc.call("eth_getBlockByNumber", hex(b), False)
        n_logs = sum(1 for log in all_logs if int(log["blockNumber"], 16) == b)
        want.append((b, len(block["transactions"]), int(block["gasUsed"], 16), n_logs))
    assert [tuple(int(x) for x in row) for row in got] == want
