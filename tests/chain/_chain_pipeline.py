"""The Monad example running in-process on real Postgres against a real anvil node: what the
chain pipeline tests share.

``monad_example(url)`` is ``examples/monad/monad.yaml`` with every pool slot pointed at a node
(``rpc_urls`` points single pools elsewhere). ``run_pipeline(...)`` deploys a document and runs
the Dispatcher, one worker with the Lite chain and alert operators, the dataset GC (promotion),
the DAG passes (fan-out, schedules, invalidation cascades) and a sink per buffered dataset
asked for (forwarder and sink in a loop), until the ``async with`` block ends; failed tasks
fail the test at every wait. A test adds its own operators with ``operators``."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import psycopg
import pyarrow.parquet as pq
import yaml

from pg_sql import sql
from trace_core.access import UserCaller
from trace_core.dag import OperatorInfo
from trace_core.lifecycle import RetryPolicy
from trace_core.testing import MemoryQueue, MemorySigner
from trace_lite.alert_operators import alert_operators
from trace_lite.buffer_forwarder import BufferForwarder, queue_name, topic
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
from trace_sdk import BUILTIN_OPERATORS, Operator, Worker

ORG = "acme"
ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "monad" / "monad.yaml"


def monad_example(url: str, *, rpc_urls: dict[str, str] | None = None) -> dict[str, Any]:
    """The example with every pool slot pointed at ``url`` (a pool named in ``rpc_urls`` at
    its own URL), 100-block windows and the follower run only when a test triggers it."""
    doc: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    # the endpoint comes from the worker-pool slot the attempt holds, not from the payload
    assert "rpc_url" not in doc["jobs"]["ingest"]["config"]
    for pool, slots in doc["worker_pools"].items():
        for slot in slots:
            slot["env"]["RPC_URL"] = (rpc_urls or {}).get(pool, url)
    doc["jobs"]["windows"]["config"]["blocks"] = 100
    doc["jobs"]["follow"]["triggers"] = [{"type": "manual"}]
    return doc


@attrs.define
class Pipeline:
    """A running deployment (``run_pipeline``) and what tests ask of it."""

    db_url: str
    data_url: str
    state: Any
    data: Any
    store: LocalObjectStore
    dispatcher: Dispatcher
    runs: DagRuns

    def done(self, job: str) -> int:
        """Completed tasks of ``job``; fails the test if any task failed."""
        failed = sql(self.db_url, "SELECT dag_job, error::text FROM tasks WHERE state='failed'")
        assert not failed, failed
        ((n,),) = sql(
            self.db_url,
            "SELECT count(*) FROM tasks WHERE dag_job = %s AND state = 'completed'",
            (job,),
        )
        return int(n)

    def buffers_idle(self) -> bool:
        """No buffer batch waits to be forwarded or stored, and none is dead-lettered."""
        ((waiting, dead),) = sql(
            self.db_url,
            "SELECT (SELECT count(*) FROM outbox WHERE topic LIKE 'buffer:%%' "
            "AND state = 'pending') + (SELECT count(*) FROM queue_messages WHERE NOT dead), "
            "(SELECT count(*) FROM queue_messages WHERE dead)",
        )
        assert not dead, "a buffer batch was dead-lettered"
        return not waiting

    async def until(self, ready: Callable[[], bool], timeout_s: float = 120) -> None:
        """Wait until ``ready()`` (checked every 0.05 s)."""
        async with asyncio.timeout(timeout_s):
            while not ready():  # noqa: ASYNC110
                await asyncio.sleep(0.05)

    async def trigger(self, job: str, run_id: str | None = None, **payload: Any) -> str:
        """Trigger ``job`` of the deployed DAG; returns its task id."""
        started = await self.runs.trigger(
            None, ORG, "monad", job, payload=payload or None, run_id=run_id
        )
        return str(started["task_id"])

    async def state_of(self, task_id: str) -> str:
        return str((await self.dispatcher.get_task(task_id))["state"])

    def event_keys(self, task_id: str) -> list[str]:
        rows = sql(
            self.db_url,
            "SELECT event_key FROM task_events WHERE task_id = %s ORDER BY seq",
            (task_id,),
        )
        return [k for (k,) in rows]

    async def objects(self, dataset: str) -> list[dict[str, Any]]:
        """The live partitions of ``dataset`` (as an org admin resolves it)."""
        org_id = sql(self.db_url, "SELECT org_id::text FROM orgs WHERE name = %s", (ORG,))[0][0]
        admin = UserCaller("alice", org_id, frozenset({"admin"}))
        res = await Datasets(self.state, object_store=self.store).resolve(
            admin, ORG, [dataset], pin_ttl_s=0
        )
        objects: list[dict[str, Any]] = res.datasets[0].objects
        return objects

    async def parquet_rows(self, dataset: str) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        for obj in await self.objects(dataset):
            table = pq.read_table(io.BytesIO(await self.store.get(obj["object_key"])))
            rows += table.to_pylist()
        return rows

    async def table(self, dataset: str) -> str:
        """The table of a buffered dataset's active version."""
        ds = await load_dataset(self.state, ORG, dataset)
        assert ds.dataset_version is not None
        return str(table_name(ds.dataset_version))

    async def table_rows(self, dataset: str, columns: str, order: str) -> list[tuple[Any, ...]]:
        """``columns`` of a buffered dataset's rows (none before its table exists)."""
        table = await self.table(dataset)
        try:
            return sql(self.data_url, f"SELECT {columns} FROM {table} ORDER BY {order}")
        except psycopg.errors.UndefinedTable:
            return []


@asynccontextmanager
async def run_pipeline(
    db_url: str,
    data_url: str,
    tmp_path: Path,
    doc: dict[str, Any],
    *,
    sinks: Sequence[str] = ("monad_block_stats",),
    background: Sequence[Callable[[asyncio.Event, Pipeline], Coroutine[Any, Any, None]]] = (),
    operators: Callable[[Pipeline], dict[str, Operator]] | None = None,
) -> AsyncIterator[Pipeline]:
    """Deploy ``doc`` in org ``ORG`` (alice an admin) and run it (module docstring); each of
    ``background`` runs alongside until the block ends; ``operators(pipeline)``: more operators
    the DAG may name and the worker runs."""
    state = await open_pool(db_url, min_size=2, max_size=12)
    data = await open_pool(data_url, min_size=1, max_size=4)
    store = LocalObjectStore(tmp_path / "objects", "http://127.0.0.1:1", b"s" * 32)
    lite = lite_operators(state, store) | alert_operators(state, data, store)
    queue = MemoryQueue("tasks")
    dispatcher = Dispatcher(
        state,
        signer=MemorySigner(),
        queue=queue,
        object_store=store,
        retry=RetryPolicy(max_attempts=3, base_s=0.0),
        rand=lambda: 0.5,
    )
    surface = InProcessTaskSurface(dispatcher)
    queues: list[PgQueue] = []
    stop = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []
    try:
        await Datasets(state, object_store=store).set_member(None, ORG, "alice", ["admin"])
        runs = DagRuns(state)
        pipeline = Pipeline(db_url, data_url, state, data, store, dispatcher, runs)
        lite |= operators(pipeline) if operators else {}
        infos = {n: OperatorInfo(n) for n in [*BUILTIN_OPERATORS, *lite]}
        await Dags(state, operators=infos).deploy(None, ORG, doc)
        worker = Worker(
            surface=surface,
            queue=queue,
            operators={**BUILTIN_OPERATORS, **lite},
            store=store,
            wait_s=0.05,
        )
        drains: list[tuple[BufferForwarder, Sink]] = []
        for name in sinks:
            ds = await load_dataset(state, ORG, name)
            q = PgQueue(state, queue_name(ds.dataset_uuid), max_receives=5)
            queues.append(q)
            forwarder = BufferForwarder(state, lambda _, q=q: q, topics=[topic(name)])
            sink = Sink(
                state_pool=state,
                data_pool=data,
                object_store=store,
                queue=q,
                org=ORG,
                dataset=name,
            )
            drains.append((forwarder, sink))

        async def sinking() -> None:
            while not stop.is_set():
                for forwarder, sink in drains:
                    await forwarder.drain()
                    await sink.process_once(max_messages=10)
                await asyncio.sleep(0.05)

        tasks = [
            asyncio.create_task(dispatcher.run_background(stop, reap_every_s=0.05)),
            asyncio.create_task(worker.run(stop)),
            asyncio.create_task(DatasetGC(state, store).run_background(stop, every_s=0.1)),
            # fan-out, schedules and invalidation cascades (replace commits announce them)
            asyncio.create_task(runs.run(stop, fan_out_every_s=0.05, schedule_every_s=0.1)),
            asyncio.create_task(sinking()),
            *(asyncio.create_task(run(stop, pipeline)) for run in background),
        ]
        yield pipeline
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        await surface.close()
        for q in queues:
            await q.close()
        await data.close()
        await state.close()
