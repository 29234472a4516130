"""A buffered ``replace`` dataset on real Postgres: a batch's scope (a block range, a partition
key, or none) is a partition whose rows are its newest producer's -- the producer task created
last. A newer producer's batches delete the scope's rows of older ones; an older producer's
batch arriving later (a slow task, a redelivery) stores nothing; other scopes are untouched;
each batch still emits its upstream event once."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import attrs
import pytest

from pg_sql import sql
from trace_core import wire
from trace_core.lifecycle import RetryPolicy
from trace_core.testing import MemoryObjectStore, MemoryQueue, MemorySigner
from trace_lite.buffer_forwarder import BufferForwarder, queue_name, topic
from trace_lite.dags import Dags
from trace_lite.datasets import Datasets, table_name
from trace_lite.dispatcher import Dispatcher, open_pool
from trace_lite.pg_queue import PgQueue
from trace_lite.sink import EVENT_TYPE, Sink, load_dataset
from trace_servers.dag_cli import builtin_operators

ORG = "acme"
DOC = {
    "name": "stats",
    "jobs": {
        "stats": {
            "operator": "noop",
            "triggers": [{"type": "manual"}],
            "outputs": [
                {
                    "storage": "postgres_table",
                    "update_strategy": "replace",
                    "buffered": True,
                    "unique_key": ["block_number"],
                    "schema": {"block_number": "uint64", "tx_count": "int64"},
                }
            ],
        }
    },
    "publish": [{"job": "stats", "output": 0, "dataset": "block_stats"}],
}


@attrs.define
class Env:
    db_url: str
    data_url: str
    state: Any
    data: Any
    dispatcher: Dispatcher
    store: MemoryObjectStore
    queue: PgQueue
    forwarder: BufferForwarder

    async def producer(self) -> dict[str, Any]:
        """A new running task (created now: later than every earlier one)."""
        (info,) = await self.dispatcher.create_tasks(
            [wire.CreateTaskRequest(operator="noop", org=ORG)]
        )
        claim = await self.dispatcher.claim(info.task_id)
        return {
            "task_id": claim.task_id,
            "attempt": claim.attempt,
            "lease_token": claim.lease_token,
        }

    async def publish(
        self, fence: dict[str, Any], key: str, rows: list[tuple[int, int]], span: Any
    ) -> None:
        batch_rows = [{"block_number": b, "tx_count": n} for b, n in rows]
        scope = None if span is None else wire.BufferScopeIn(range=wire.RangeIn(*span))
        batch = wire.BufferBatchIn(key, "block_stats", scope=scope, rows=batch_rows)
        await self.dispatcher.publish_buffer(wire.BufferPublishRequest(**fence, batch=batch))

    def sink(self) -> Sink:
        return Sink(
            state_pool=self.state,
            data_pool=self.data,
            object_store=self.store,
            queue=self.queue,
            org=ORG,
            dataset="block_stats",
        )

    async def rows(self) -> list[tuple[int, int, str]]:
        ds = await load_dataset(self.state, ORG, "block_stats")
        assert ds.dataset_version is not None
        got = sql(
            self.data_url,
            f"SELECT block_number, tx_count, _task_id::text FROM {table_name(ds.dataset_version)} "
            "ORDER BY block_number",
        )
        return [(int(b), int(n), t) for b, n, t in got]


@pytest.fixture
async def env(db_url: str, data_db_url: str) -> AsyncIterator[Env]:
    state = await open_pool(db_url, min_size=1, max_size=6)
    data = await open_pool(data_db_url, min_size=1, max_size=4)
    store = MemoryObjectStore()
    dispatcher = Dispatcher(
        state,
        signer=MemorySigner(),
        queue=MemoryQueue("tasks"),
        object_store=store,
        retry=RetryPolicy(max_attempts=3, base_s=0.0),
    )
    await Datasets(state, object_store=store).set_member(None, ORG, "alice", ["admin"])
    await Dags(state, operators=builtin_operators()).deploy(None, ORG, DOC)
    ds = await load_dataset(state, ORG, "block_stats")
    assert ds.update_strategy == "replace"
    queue = PgQueue(state, queue_name(ds.dataset_uuid), max_receives=5)
    forwarder = BufferForwarder(state, lambda _: queue, topics=[topic("block_stats")])
    try:
        yield Env(db_url, data_db_url, state, data, dispatcher, store, queue, forwarder)
    finally:
        await queue.close()
        await data.close()
        await state.close()


async def drain(sink: Sink) -> None:
    while await sink.process_once(max_messages=1):
        pass


async def test_a_newer_producer_replaces_the_scope_and_leaves_other_scopes(env: Env) -> None:
    first, other = await env.producer(), await env.producer()
    await env.publish(first, "a", [(40, 1), (41, 2)], (40, 42))
    await env.publish(other, "b", [(42, 7)], (42, 44))  # another scope
    await env.forwarder.drain()
    sink = env.sink()
    await drain(sink)
    assert [r[:2] for r in await env.rows()] == [(40, 1), (41, 2), (42, 7)]

    second = await env.producer()  # the range again, after a reorg: other counts, fewer rows
    await env.publish(second, "a", [(40, 5)], (40, 42))
    await env.publish(second, "a2", [(41, 6)], (40, 42))  # its second batch of the scope
    await env.forwarder.drain()
    await drain(sink)
    assert await env.rows() == [
        (40, 5, second["task_id"]),
        (41, 6, second["task_id"]),
        (42, 7, other["task_id"]),
    ]
    assert sink.stats["replaced"] == 2
    # every batch committed emitted its event once
    events = sql(
        env.db_url, "SELECT count(*) FROM task_events WHERE event_type = %s", (EVENT_TYPE,)
    )
    assert events == [(4,)]


async def test_an_older_producer_arriving_late_stores_nothing(env: Env) -> None:
    old, new = await env.producer(), await env.producer()
    await env.publish(old, "a", [(40, 1), (41, 1)], (40, 42))
    await env.publish(new, "a", [(40, 2), (41, 2)], (40, 42))
    await env.forwarder.drain()
    sink = env.sink()
    # the newer producer's batch is handled first (the queue does not keep order)
    messages = await env.queue.receive(max_messages=10, visibility_timeout=30)
    by_task = {json.loads(m.body)["task_id"]: m for m in messages}
    await sink.handle(by_task[new["task_id"]])
    results = await sink.handle_many([by_task[old["task_id"]]])
    assert [(r.outcome, r.inserted, r.emitted) for r in results] == [("stored", 0, True)]
    assert await env.rows() == [(40, 2, new["task_id"]), (41, 2, new["task_id"])]
    # a redelivery of the newer batch changes nothing
    await env.queue.send([by_task[new["task_id"]].body])
    await drain(sink)
    assert await env.rows() == [(40, 2, new["task_id"]), (41, 2, new["task_id"])]


async def test_concurrent_sinks_of_one_scope_end_with_the_newest_producer(env: Env) -> None:
    producers = [await env.producer() for _ in range(4)]
    for n, fence in enumerate(producers):
        await env.publish(fence, "a", [(40, n), (41, n)], (40, 42))
    await env.forwarder.drain()
    sinks = [env.sink() for _ in range(4)]
    await asyncio.gather(*(drain(s) for s in sinks))
    newest = producers[-1]["task_id"]
    assert await env.rows() == [(40, 3, newest), (41, 3, newest)]


async def test_unscoped_batches_are_one_scope(env: Env) -> None:
    old, new = await env.producer(), await env.producer()
    await env.publish(old, "a", [(1, 1), (2, 1)], None)
    await env.publish(new, "a", [(3, 3)], None)
    await env.forwarder.drain()
    await drain(env.sink())
    assert await env.rows() == [(3, 3, new["task_id"])]
