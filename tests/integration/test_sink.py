"""The sink of buffered Postgres datasets on real Postgres (state and data databases):
buffer-publish -> outbox -> the dataset's queue -> strict parse -> the version's table, each
dedupe key once -> the upstream event once per committed batch -> delete; malformed batches to
the DLQ with row and field; redelivery after a crash at each point."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import attrs
import pytest

from pg_sql import sql
from trace_aws.sqs_queue import SqsQueue
from trace_core import errors, wire
from trace_core.lifecycle import RetryPolicy
from trace_core.ports import Queue
from trace_core.sink import DatasetSchema
from trace_core.testing import MemoryObjectStore, MemoryQueue, MemorySigner
from trace_lite.buffer_forwarder import BufferForwarder, queue_name, topic
from trace_lite.dag_remat import DagRemat
from trace_lite.dag_runs import DagRuns
from trace_lite.dags import Dags
from trace_lite.datasets import Datasets, table_name
from trace_lite.dispatcher import Dispatcher, open_pool
from trace_lite.pg_queue import PgQueue
from trace_lite.sink import EVENT_TYPE, Sink, SinkCrash, load_dataset
from trace_lite.sink_tables import ensure_table
from trace_servers.dag_cli import builtin_operators

ORG = "acme"


def dag_doc(schema: dict[str, str] | None = None, *, name: str = "alerts") -> dict[str, Any]:
    return {
        "name": name,
        "jobs": {
            "detect": {
                "operator": "emit_events",
                "triggers": [{"type": "manual"}],
                "outputs": [
                    {
                        "storage": "postgres_table",
                        "update_strategy": "append",
                        "buffered": True,
                        "multi_writer": True,
                        "unique_key": ["tx_hash", "log_index"],
                        "schema": schema
                        or {"tx_hash": "bytes", "log_index": "int32", "value": "uint256"},
                    }
                ],
            }
        },
        "publish": [{"job": "detect", "output": 0, "dataset": "transfers"}],
    }


@attrs.define
class Env:
    db_url: str
    data_url: str
    dispatcher: Dispatcher
    dags: Dags
    store: MemoryObjectStore
    forwarder: BufferForwarder
    queues: dict[str, Any]
    pools: list[Any]
    #: ``None`` for Lite (PgQueue), else the moto server's URL (SqsQueue)
    sqs_url: str | None = None
    tag: str = ""

    @property
    def visibility(self) -> float:
        return 1.0 if self.sqs_url else 30.0

    def queue(self, name: str) -> Queue:
        if name not in self.queues:
            if self.sqs_url:
                self.queues[name] = SqsQueue.create(
                    f"{name[:40]}-{self.tag}", endpoint_url=self.sqs_url, max_receives=5
                )
            else:
                self.queues[name] = PgQueue(self.pools[0], name, max_receives=5)
        q: Queue = self.queues[name]
        return q

    async def dataset_queue(self) -> Any:
        ds = await load_dataset(self.pools[0], ORG, "transfers")
        return self.queue(queue_name(ds.dataset_uuid))

    async def sink(self, fault: Callable[[str], Awaitable[None]] | None = None) -> Sink:
        return Sink(
            state_pool=self.pools[0],
            data_pool=self.pools[1],
            object_store=self.store,
            queue=await self.dataset_queue(),
            org=ORG,
            dataset="transfers",
            visibility_timeout_s=self.visibility,
            fault=fault,
        )

    async def task(self) -> dict[str, Any]:
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
        self,
        fence: dict[str, Any],
        key: str,
        rows: list[Any],
        scope: wire.BufferScopeIn | None = None,
        dataset: str = "transfers",
    ) -> None:
        data = b"".join(
            (r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows
        )
        prefix = (await self.dispatcher.fetch(fence["task_id"])).staging_prefix
        object_key = f"{prefix}buffer/{dataset}/{key}.jsonl"
        info = await self.store.put(object_key, data)
        batch = wire.BufferBatchIn(
            key, dataset, object_key, len(rows), info.size, info.sha256, scope
        )
        await self.dispatcher.publish_buffer(wire.BufferPublishRequest(**fence, batch=batch))

    def table(self, version: str) -> list[tuple[Any, ...]]:
        return sql(
            self.data_url,
            f"SELECT encode(tx_hash, 'hex'), log_index, value FROM {table_name(version)} "
            "ORDER BY 1, 2",
        )

    async def version(self) -> str:
        ds = await load_dataset(self.pools[0], ORG, "transfers")
        assert ds.dataset_version is not None
        return ds.dataset_version

    def events(self) -> list[tuple[Any, ...]]:
        return sql(
            self.db_url,
            "SELECT event_key, payload->>'row_count' FROM task_events WHERE event_type = %s "
            "ORDER BY seq",
            (EVENT_TYPE,),
        )

    async def redeliver_now(self) -> None:
        """The visibility timeout passes (a crashed sink's messages become visible again)."""
        if self.sqs_url:
            await asyncio.sleep(self.visibility + 0.5)
        else:
            sql(self.db_url, "UPDATE queue_messages SET visible_at = now() WHERE NOT dead")


@pytest.fixture(params=["lite", "aws"])
async def env(request: pytest.FixtureRequest, db_url: str, data_db_url: str) -> AsyncIterator[Env]:
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
    ds = Datasets(state, object_store=store)
    await ds.set_member(None, ORG, "alice", ["admin"])
    dags = Dags(state, operators=builtin_operators())
    await dags.deploy(None, ORG, dag_doc())
    queues: dict[str, Any] = {}
    fwd = BufferForwarder(state, lambda u: e.queue(queue_name(u)), topics=[topic("transfers")])
    e = Env(db_url, data_db_url, dispatcher, dags, store, fwd, queues, [state, data])
    if request.param == "aws":
        e.sqs_url = request.getfixturevalue("moto_server").url
        e.tag = uuid.uuid4().hex[:12]
    try:
        yield e
    finally:
        for q in queues.values():
            await q.close()
        await state.close()
        await data.close()


def row(i: int, value: int = 1) -> dict[str, Any]:
    return {"tx_hash": f"0x{i:04x}", "log_index": i % 3, "value": str(value)}


async def drain(sink: Sink) -> None:
    while await sink.process_once():
        pass


async def test_publish_forward_sink_stores_rows_and_emits_one_event(env: Env) -> None:
    fence = await env.task()
    await env.publish(fence, "b1", [row(1), row(2, 2**200)])
    assert await env.forwarder.drain() == 1
    rows = sql(env.db_url, "SELECT topic, state FROM outbox WHERE topic LIKE 'buffer:%'")
    assert rows == [("buffer:transfers", "published")]
    sink = await env.sink()
    await drain(sink)
    assert env.table(await env.version()) == [("0001", 1, 1), ("0002", 2, 2**200)]
    assert env.events() == [
        (f"sink/{(await load_dataset(env.pools[0], ORG, 'transfers')).dataset_uuid}/b1", "2")
    ]
    queue = await env.dataset_queue()
    assert (await queue.depth(), await queue.dead_letters()) == (0, [])


async def test_the_same_batch_twice_and_overlapping_batches_store_each_key_once(env: Env) -> None:
    fence = await env.task()
    await env.publish(fence, "b1", [row(1), row(2)])
    await env.publish(fence, "b2", [row(2), row(3)])  # overlaps b1 on row 2
    await env.forwarder.drain()
    queue = await env.dataset_queue()
    # the same announcement forwarded twice (at-least-once): the same batch arrives twice
    first = (await queue.receive(max_messages=1, visibility_timeout=0))[0]
    await queue.send([first.body])
    sink = await env.sink()
    await drain(sink)
    assert [r[0] for r in env.table(await env.version())] == ["0001", "0002", "0003"]
    assert len(env.events()) == 2  # one per committed batch, not per delivery
    assert sink.stats["batches"] == 3 and sink.stats["inserted"] == 3


async def test_a_retried_attempt_republishing_the_rows_dedupes(env: Env) -> None:
    fence = await env.task()
    await env.publish(fence, "b1", [row(1), row(2)])
    sql(env.db_url, "UPDATE tasks SET lease_expires_at = now() - interval '1 s'")
    await env.dispatcher.reap_once()
    sql(env.db_url, "UPDATE tasks SET available_at = now()")
    await env.dispatcher.reap_once()
    claim = await env.dispatcher.claim(fence["task_id"])
    again = {"task_id": claim.task_id, "attempt": claim.attempt, "lease_token": claim.lease_token}
    assert again["attempt"] == 2
    await env.publish(again, "b1-retry", [row(1), row(2), row(4)])
    # the stale attempt cannot publish: 409, nothing of it reaches the table
    with pytest.raises(errors.LeaseLost):
        await env.publish(fence, "stale", [row(9)])
    await env.forwarder.drain()
    await drain(await env.sink())
    assert [r[0] for r in env.table(await env.version())] == ["0001", "0002", "0004"]
    assert len(env.events()) == 2


def span(start: int, end: int) -> wire.BufferScopeIn:
    return wire.BufferScopeIn(range=wire.RangeIn(start, end))


async def test_a_batch_scope_is_part_of_the_dedupe_key(env: Env) -> None:
    fence = await env.task()
    await env.publish(fence, "r0", [row(1), row(2)], span(0, 10))
    # the same unique_key values under another range are other rows
    await env.publish(fence, "r1", [row(1)], span(10, 20))
    await env.publish(fence, "c", [row(1)], wire.BufferScopeIn(cursor="0xabc"))
    await env.publish(fence, "p", [row(1)], wire.BufferScopeIn(partition_key="2026-11-30"))
    # the scope is part of the recorded pointer: reusing a key under another scope is refused
    with pytest.raises(errors.IdempotencyMismatch):
        await env.publish(fence, "r0", [row(1), row(2)], span(0, 11))
    stored = sql(env.db_url, "SELECT batch_key, scope FROM buffer_batches ORDER BY 1")
    assert stored == [
        ("c", {"cursor": "0xabc"}),
        ("p", {"partition_key": "2026-11-30"}),
        ("r0", {"range": {"start": 0, "end": 10}}),
        ("r1", {"range": {"start": 10, "end": 20}}),
    ]
    # a retried attempt re-publishing the same rows for the same range stores nothing new
    sql(env.db_url, "UPDATE tasks SET lease_expires_at = now() - interval '1 s'")
    await env.dispatcher.reap_once()
    sql(env.db_url, "UPDATE tasks SET available_at = now()")
    await env.dispatcher.reap_once()
    claim = await env.dispatcher.claim(fence["task_id"])
    again = {"task_id": claim.task_id, "attempt": claim.attempt, "lease_token": claim.lease_token}
    await env.publish(again, "r0-retry", [row(1), row(2), row(4)], span(0, 10))
    await env.forwarder.drain()
    sink = await env.sink()
    await drain(sink)
    rows = [r[0] for r in env.table(await env.version())]
    assert rows == ["0001", "0001", "0001", "0001", "0002", "0004"]
    assert sink.stats["inserted"] == 6 and len(env.events()) == 5


async def test_a_message_with_a_malformed_scope_is_dead_lettered(env: Env) -> None:
    fence = await env.task()
    await env.publish(fence, "b1", [row(1)], span(0, 10))
    await env.forwarder.drain()
    queue = await env.dataset_queue()
    (msg,) = await queue.receive(max_messages=1, visibility_timeout=0)
    body = json.loads(msg.body)
    assert body["scope"] == {"range": {"start": 0, "end": 10}}
    await queue.delete([msg.receipt])
    await queue.send([json.dumps({**body, "scope": {"range": {"start": 5, "end": 1}}}).encode()])
    sink = await env.sink()
    await drain(sink)
    (dead,) = await queue.dead_letters()
    assert "scope.range.end" in str(dead.dead_letter_reason)
    assert env.events() == []


async def test_inline_batches_are_stored_like_staged_ones(env: Env) -> None:
    fence = await env.task()
    big = [row(i, 2**255 + i) for i in range(1000)]  # about 110 KiB in one queue message

    async def inline(key: str, rows: list[Any]) -> wire.BufferPublishResponse:
        batch = wire.BufferBatchIn(key, "transfers", rows=rows)
        return await env.dispatcher.publish_buffer(wire.BufferPublishRequest(**fence, batch=batch))

    assert not (await inline("i1", big)).duplicate
    assert (await inline("i1", big)).duplicate  # the same call again
    with pytest.raises(errors.IdempotencyMismatch):
        await inline("i1", big[:10])
    await env.publish(fence, "staged", [row(1), row(5000)])  # overlaps the inline rows on row 1
    # more than INLINE_MAX_BYTES as JSON lines: refused, nothing recorded
    huge = [{"tx_hash": "0x" + "ab" * 2000, "log_index": i, "value": "1"} for i in range(70)]
    with pytest.raises(errors.ValidationFailed) as info:
        await inline("i2", huge)
    assert info.value.field == "batch.rows"
    stored = sql(env.db_url, "SELECT batch_key, object_key IS NULL FROM buffer_batches ORDER BY 1")
    assert stored == [("i1", True), ("staged", False)]
    assert await env.forwarder.drain() == 2
    sink = await env.sink()
    await drain(sink)
    table = env.table(await env.version())
    assert len(table) == 1001 and table[-1] == ("1388", 5000 % 3, 1)
    assert table[0] == ("0000", 0, 2**255)
    assert len(env.events()) == 2
    queue = await env.dataset_queue()
    assert (await queue.depth(), await queue.dead_letters()) == (0, [])


@pytest.mark.parametrize("point", ["before_commit", "after_commit", "after_event"])
async def test_redelivery_after_a_crash_at_each_point_stores_once_and_emits_once(
    env: Env, point: str
) -> None:
    fence = await env.task()
    await env.publish(fence, "b1", [row(1), row(2)])
    await env.publish(fence, "b2", [row(3)])
    await env.forwarder.drain()

    async def crash(at: str) -> None:
        if at == point:
            raise SinkCrash(at)

    with pytest.raises(SinkCrash):
        await (await env.sink(crash)).process_once(max_messages=1)
    version = await env.version()
    committed = point != "before_commit"
    exists = sql(env.data_url, "SELECT to_regclass(%s) IS NOT NULL", (table_name(version),))
    assert exists[0][0] == committed  # the first batch's rollback took the new table with it
    if committed:
        assert len(env.table(version)) == 2
    assert len(env.events()) == (1 if point == "after_event" else 0)
    await env.redeliver_now()
    sink = await env.sink()
    await drain(sink)
    assert [r[0] for r in env.table(version)] == ["0001", "0002", "0003"]
    assert [e[1] for e in env.events()] == ["2", "1"]  # one event per committed batch
    queue = await env.dataset_queue()
    assert (await queue.depth(), await queue.dead_letters()) == (0, [])


async def test_a_batch_with_a_bad_row_goes_whole_to_the_dlq_and_replays_after_the_fix(
    env: Env,
) -> None:
    fence = await env.task()
    await env.publish(fence, "good1", [row(1)])
    await env.publish(fence, "mixed", [row(2), {**row(3), "value": "-5"}, row(4)])
    await env.publish(fence, "good2", [row(5)])
    await env.forwarder.drain()
    sink = await env.sink()
    await drain(sink)
    version = await env.version()
    assert [r[0] for r in env.table(version)] == ["0001", "0005"]
    queue = await env.dataset_queue()
    (dead,) = await queue.dead_letters()
    assert dead.dead_letter_reason is not None
    assert "row 1 field value" in dead.dead_letter_reason
    assert "out of range for uint256" in dead.dead_letter_reason
    assert len(env.events()) == 2
    # the schema is fixed (value widened to a signed type, a rebuild cut over: a new version)
    # and the dead letter replayed: its rows land once, in the version now active
    await env.dags.deploy(
        None, ORG, dag_doc({"tx_hash": "bytes", "log_index": "int32", "value": "decimal"})
    )
    assert len(await DagRemat(env.pools[0]).cutover_once()) == 1
    fixed = await env.version()
    assert fixed != version
    assert await queue.redrive() == 1
    await drain(sink)
    assert [r[0] for r in env.table(fixed)] == ["0002", "0003", "0004"]
    assert [r[0] for r in env.table(version)] == ["0001", "0005"]
    assert await queue.redrive() == 0  # nothing dead any more
    assert len(env.events()) == 3


async def test_pointer_that_does_not_match_its_object_is_dead_lettered(env: Env) -> None:
    fence = await env.task()
    await env.publish(fence, "b1", [row(1)])
    await env.forwarder.drain()
    (key,) = [k for k in env.store._objects if k.endswith("b1.jsonl")]
    await env.store.put(key, b'{"tx_hash": "0x09", "log_index": 0}\n')  # changed after publish
    await drain(await env.sink())
    (dead,) = await (await env.dataset_queue()).dead_letters()
    assert "sha256" in str(dead.dead_letter_reason)
    assert env.events() == []


async def test_announcements_of_an_unknown_dataset_are_not_forwarded(env: Env) -> None:
    fence = await env.task()
    prefix = (await env.dispatcher.fetch(fence["task_id"])).staging_prefix
    info = await env.store.put(f"{prefix}x.jsonl", b"{}\n")
    batch = wire.BufferBatchIn("b1", "nosuch", f"{prefix}x.jsonl", 1, info.size, info.sha256)
    await env.dispatcher.publish_buffer(wire.BufferPublishRequest(**fence, batch=batch))
    fwd = BufferForwarder(env.pools[0], env.queue, topics=[topic("nosuch")])
    assert await fwd.forward_once() == 0
    ((state, tries),) = sql(
        env.db_url, "SELECT state, tries FROM outbox WHERE topic = 'buffer:nosuch'"
    )
    assert (state, tries) == ("pending", 1)
    assert env.queues == {}  # nothing was sent anywhere


def columns(url: str, table: str) -> dict[str, str]:
    rows = sql(
        url,
        "SELECT attname::text, format_type(atttypid, atttypmod) FROM pg_attribute "
        "WHERE attrelid = to_regclass(%s) AND attnum > 0 AND NOT attisdropped "
        "AND left(attname, 1) <> '_'",
        (table,),
    )
    return dict(rows)


async def test_a_widening_redeploy_rebuilds_into_a_staged_version_with_the_new_schema(
    env: Env,
) -> None:
    """The DAG redeploys with a new column and two widened types: the deploy stages a rebuild
    (trace_lite.dag_remat). While it builds, batches of the active version's task go to the
    active table under the old schema, batches of the staged task to the staged version's
    table under the staged schema; after the cutover every batch goes to the new version."""
    runs = DagRuns(env.pools[0])
    started = await runs.trigger(None, ORG, "alerts", "detect")
    claim = await env.dispatcher.claim(started["task_id"])
    live = {"task_id": claim.task_id, "attempt": claim.attempt, "lease_token": claim.lease_token}
    await env.publish(live, "a1", [row(1)])
    old_version = await env.version()
    wider = {"tx_hash": "bytes", "log_index": "int64", "value": "decimal", "memo": "string"}
    deployed = await env.dags.deploy(None, ORG, dag_doc(wider))
    assert deployed.staged_version == 2
    ((staged_id,),) = sql(env.db_url, "SELECT task_id::text FROM tasks WHERE dag_version = 2")
    claim = await env.dispatcher.claim(staged_id)
    staged = {"task_id": claim.task_id, "attempt": claim.attempt, "lease_token": claim.lease_token}
    await env.publish(staged, "s1", [{**row(2), "log_index": 2**40, "value": "-1.5", "memo": "m"}])
    await env.publish(live, "a2", [row(3)])
    await env.forwarder.drain()
    sink = await env.sink()
    await drain(sink)
    assert sink.stats["dead"] == 0
    assert await env.version() == old_version  # the active pointer has not moved
    ((staged_version,),) = sql(
        env.db_url,
        "SELECT payload->>'dataset_version' FROM task_events WHERE event_key LIKE '%/s1'",
    )
    assert staged_version != old_version
    assert [r[0] for r in env.table(old_version)] == ["0001", "0003"]
    assert columns(env.data_url, table_name(old_version)) == {
        "tx_hash": "bytea",
        "log_index": "integer",
        "value": "numeric(78,0)",
    }
    assert columns(env.data_url, table_name(staged_version)) == {
        "tx_hash": "bytea",
        "log_index": "bigint",
        "value": "numeric",
        "memo": "text",
    }
    stored = sql(
        env.data_url,
        f"SELECT encode(tx_hash, 'hex'), log_index, value::text, memo "
        f"FROM {table_name(staged_version)}",
    )
    assert stored == [("0002", 2**40, "-1.5", "m")]
    await env.dispatcher.complete(wire.CompleteRequest(**staged))
    await runs.fan_out_once()  # the staged task's events, then the cutover
    assert len(await DagRemat(env.pools[0]).cutover_once()) == 1
    assert await env.version() == staged_version
    fence = await env.task()  # a producer outside the DAG: the active version, new schema
    await env.publish(fence, "after", [{**row(4), "memo": "late"}])
    await env.forwarder.drain()
    await drain(sink)
    assert sorted(r[0] for r in env.table(staged_version)) == ["0002", "0004"]
    assert len(env.events()) == 4


async def test_ensure_table_adds_nullable_columns_and_widens_types_in_place(env: Env) -> None:
    """The table of a version evolves in place to a wider schema (ADD COLUMN, ALTER COLUMN
    TYPE), old rows keep their values; a type it cannot widen to is refused, nothing altered."""
    version = await env.version()
    narrow = DatasetSchema.of({"k": "string", "n": "int32", "v": "uint64"}, ["k"])
    wide = DatasetSchema.of({"k": "string", "n": "int64", "v": "uint256", "memo": "json"}, ["k"])
    pool = env.pools[1]
    async with pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
        assert await ensure_table(cur, version, narrow) == (0, 0)
        await cur.execute(
            f"INSERT INTO {table_name(version)} (k, n, v, _dedupe_key, _task_id, _batch_key) "
            "VALUES ('a', 7, 18446744073709551615, '\\x00', gen_random_uuid(), 'b')"
        )
    async with pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
        assert await ensure_table(cur, version, wide) == (1, 2)
        assert await ensure_table(cur, version, wide) == (0, 0)
    assert columns(env.data_url, table_name(version)) == {
        "k": "text",
        "n": "bigint",
        "v": "numeric(78,0)",
        "memo": "jsonb",
    }
    assert sql(env.data_url, f"SELECT k, n, v::text, memo FROM {table_name(version)}") == [
        ("a", 7, "18446744073709551615", None)
    ]
    text = DatasetSchema.of({"k": "string", "n": "string", "v": "uint256"}, ["k"])
    with pytest.raises(errors.ValidationFailed) as exc:
        async with pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
            await ensure_table(cur, version, text)
    assert exc.value.field == "schema.n" and "is bigint" in exc.value.message
    assert columns(env.data_url, table_name(version))["n"] == "bigint"


async def test_a_table_changed_outside_trace_dead_letters_its_batches_with_the_reason(
    env: Env,
) -> None:
    """A column whose type the table holds cannot be widened to the declared one (altered by
    hand): the batch goes to the DLQ at once with the column named; nothing is written."""
    fence = await env.task()
    await env.publish(fence, "b1", [row(1)])
    await env.forwarder.drain()
    await drain(await env.sink())
    version = await env.version()
    sql(env.data_url, f"ALTER TABLE {table_name(version)} ALTER COLUMN log_index TYPE text")
    await env.publish(fence, "b2", [row(2)])
    await env.forwarder.drain()
    sink = await env.sink()
    await drain(sink)
    assert sink.stats["dead"] == 1
    (dead,) = await (await env.dataset_queue()).dead_letters()
    assert "schema.log_index" in str(dead.dead_letter_reason)
    assert "is text" in str(dead.dead_letter_reason)
    assert [r[0] for r in env.table(version)] == ["0001"]
    assert len(env.events()) == 1


def multi_writer_doc() -> dict[str, Any]:
    """DAG ``writers``: two jobs write ``mw`` (multi_writer), ``detect_a`` from its output 1; a
    job of the same DAG reads ``detect_a``'s output 1."""
    doc = dag_doc(name="writers")
    out = doc["jobs"]["detect"]["outputs"][0]
    scratch = {"storage": "object_store", "update_strategy": "replace"}
    manual = [{"type": "manual"}]
    doc["jobs"] = {
        "detect_a": {"operator": "emit_events", "triggers": manual, "outputs": [scratch, out]},
        "detect_b": {"operator": "emit_events", "triggers": manual, "outputs": [out]},
        "after_a": {
            "operator": "emit_events",
            "inputs": [{"from": {"job": "detect_a", "output": 1}}],
        },
    }
    doc["publish"] = [
        {"job": "detect_a", "output": 1, "dataset": "mw"},
        {"job": "detect_b", "output": 0, "dataset": "mw"},
    ]
    return doc


async def test_every_writer_of_a_multi_writer_dataset_reaches_its_readers_once(env: Env) -> None:
    """Two jobs publish batches into one multi_writer dataset; a DAG reading it with
    ``from: {dataset}`` gets one task per committed batch of either writer, a job reading one
    writer's output gets that writer's events only; redelivered batches and repeated fan-out
    passes create nothing more."""
    await env.dags.deploy(None, ORG, multi_writer_doc())
    reader = {
        "name": "readers",
        "jobs": {"read": {"operator": "emit_events", "inputs": [{"from": {"dataset": "mw"}}]}},
    }
    await env.dags.deploy(None, ORG, reader)
    runs = DagRuns(env.pools[0])
    writers = {}
    for job in ("detect_a", "detect_b"):
        started = await runs.trigger(None, ORG, "writers", job)
        claim = await env.dispatcher.claim(started["task_id"])
        fence = {
            "task_id": claim.task_id,
            "attempt": claim.attempt,
            "lease_token": claim.lease_token,
        }
        writers[job] = claim.task_id
        await env.publish(fence, f"{job}-1", [row(1), row(2)], dataset="mw")
        await env.publish(fence, f"{job}-2", [row(3)], dataset="mw")
    ds = await load_dataset(env.pools[0], ORG, "mw")
    await BufferForwarder(
        env.pools[0], lambda u: env.queue(queue_name(u)), topics=[topic("mw")]
    ).drain()
    queue = env.queue(queue_name(ds.dataset_uuid))
    (message,) = await queue.receive(max_messages=1, visibility_timeout=0)
    await queue.send([message.body])  # one batch delivered twice
    sink = Sink(
        state_pool=env.pools[0],
        data_pool=env.pools[1],
        object_store=env.store,
        queue=queue,
        org=ORG,
        dataset="mw",
        visibility_timeout_s=env.visibility,
    )
    await drain(sink)
    assert len(env.events()) == 4
    report = await runs.fan_out_once()
    assert report.events == 4
    assert (await runs.fan_out_once()).events == 0
    tasks = sql(
        env.db_url,
        "SELECT t.dag_job, t.payload->'event'->>'producer_task_id', "
        "t.payload->'event'->>'key', i.dataset_version::text FROM tasks t "
        "LEFT JOIN task_inputs i ON i.task_id = t.task_id "
        "WHERE t.dag_job IN ('read', 'after_a') ORDER BY 1, 3",
    )
    uuid_, version = ds.dataset_uuid, ds.dataset_version
    reads = [(p, k, v) for job, p, k, v in tasks if job == "read"]
    assert reads == [
        (writers[j], f"sink/{uuid_}/{j}-{n}", version)
        for j in ("detect_a", "detect_b")
        for n in (1, 2)
    ]
    after_a = [(p, k) for job, p, k, _ in tasks if job == "after_a"]
    assert after_a == [(writers["detect_a"], f"sink/{uuid_}/detect_a-{n}") for n in (1, 2)]
    outputs = sql(
        env.db_url,
        "SELECT t.dag_job, e.payload->>'output' FROM task_events e JOIN tasks t USING (task_id) "
        "WHERE e.event_type = %s ORDER BY 1",
        (EVENT_TYPE,),
    )
    assert outputs == [("detect_a", "1"), ("detect_a", "1"), ("detect_b", "0"), ("detect_b", "0")]


async def test_the_upstream_event_fans_out_to_the_consuming_job_once(env: Env) -> None:
    """A committed batch of a DAG task is announced to the fan-out, which creates one task of
    the job reading the output; a redelivered batch creates nothing more."""
    doc = dag_doc()
    doc["jobs"]["notify"] = {
        "operator": "emit_events",
        "inputs": [{"from": {"job": "detect", "output": 0}}],
    }
    await env.dags.deploy(None, ORG, doc)
    await DagRemat(env.pools[0]).cutover_once()  # the new job's (empty) rebuild
    runs = DagRuns(env.pools[0])
    started = await runs.trigger(None, ORG, "alerts", "detect")
    claim = await env.dispatcher.claim(started["task_id"])
    fence = {"task_id": claim.task_id, "attempt": claim.attempt, "lease_token": claim.lease_token}
    await env.publish(fence, "b1", [row(1), row(2)])
    await env.forwarder.drain()
    queue = await env.dataset_queue()
    (message,) = await queue.receive(max_messages=1, visibility_timeout=0)
    await queue.send([message.body])  # delivered twice
    await drain(await env.sink())
    report = await runs.fan_out_once()
    assert (report.events, report.created) == (1, 1)
    assert (await runs.fan_out_once()).events == 0
    ((payload,),) = sql(env.db_url, "SELECT payload FROM tasks WHERE dag_job = 'notify'")
    event = payload["event"]
    assert (event["type"], event["payload"]["row_count"]) == (EVENT_TYPE, 2)
    assert event["producer_task_id"] == started["task_id"]


async def test_concurrent_sinks_on_one_dataset_store_each_key_once(env: Env) -> None:
    """Three sinks drain overlapping batches of two producers (multi-writer) at once: the
    table is created once, each (producer, key) stored once, one event per batch."""
    fences = [await env.task(), await env.task()]
    for f in fences:
        for b in range(6):
            await env.publish(f, f"b{b}", [row(i) for i in range(b * 5, b * 5 + 10)])
    await env.forwarder.drain()
    sinks = [await env.sink() for _ in range(3)]
    await asyncio.gather(*(drain(s) for s in sinks))
    version = await env.version()
    rows = sql(
        env.data_url,
        f"SELECT _task_id::text, count(*), count(DISTINCT (tx_hash, log_index)) "
        f"FROM {table_name(version)} GROUP BY 1 ORDER BY 1",
    )
    assert sorted(r[0] for r in rows) == sorted(f["task_id"] for f in fences)
    assert all(n == distinct == 35 for _, n, distinct in rows)
    assert len(env.events()) == 12
    assert sum(s.stats["batches"] for s in sinks) == 12


async def test_messages_that_are_not_buffer_batches_are_dead_lettered_with_the_reason(
    env: Env,
) -> None:
    queue = await env.dataset_queue()
    good = {
        "task_id": "00000000-0000-4000-8000-000000000000",
        "attempt": 1,
        "batch_key": "b",
        "dataset_uuid": (await load_dataset(env.pools[0], ORG, "transfers")).dataset_uuid,
        "object_key": "org/x/staging/b.jsonl",
        "row_count": 1,
        "byte_size": 1,
        "sha256": "0" * 64,
    }
    bodies = [
        b"not json",
        json.dumps({**good, "attempt": "1"}).encode(),
        json.dumps({k: v for k, v in good.items() if k != "sha256"}).encode(),
        json.dumps({**good, "dataset_uuid": "00000000-0000-4000-8000-000000000009"}).encode(),
        json.dumps(good).encode(),  # a pointer to no object
    ]
    await queue.send(bodies)
    sink = await env.sink()
    await drain(sink)
    assert sink.stats["dead"] == 5
    reasons = sorted(str(m.dead_letter_reason) for m in await queue.dead_letters())
    assert len(reasons) == 5
    assert any("attempt must be int" in r for r in reasons)
    assert any("not a buffer message" in r for r in reasons)
    assert any("this sink serves" in r for r in reasons)
    assert any(r.startswith("not_found") for r in reasons)
    assert env.events() == []


async def test_a_task_of_another_dag_is_refused_at_publish(env: Env) -> None:
    """``transfers`` is DAG ``alerts``'s: a task of DAG ``rogue`` publishing a batch into it is
    refused at once (403 Forbidden, field ``batch.dataset``), nothing recorded or announced; a
    task of ``alerts`` publishes as before."""
    await env.dags.deploy(None, ORG, dag_doc())
    rogue = {
        "name": "rogue",
        "jobs": {"detect": {"operator": "emit_events", "triggers": [{"type": "manual"}]}},
    }
    await env.dags.deploy(None, ORG, rogue)
    runs = DagRuns(env.pools[0])
    fences = {}
    for dag in ("rogue", "alerts"):
        started = await runs.trigger(None, ORG, dag, "detect")
        claim = await env.dispatcher.claim(started["task_id"])
        fences[dag] = {
            "task_id": claim.task_id,
            "attempt": claim.attempt,
            "lease_token": claim.lease_token,
        }
    before = sql(env.db_url, "SELECT count(*) FROM outbox")
    with pytest.raises(errors.Forbidden) as info:
        await env.publish(fences["rogue"], "rogue-1", [row(1)])
    assert info.value.field == "batch.dataset"
    assert "produced by another DAG" in info.value.message
    assert sql(env.db_url, "SELECT count(*) FROM buffer_batches") == [(0,)]
    assert sql(env.db_url, "SELECT count(*) FROM outbox") == before
    await env.publish(fences["alerts"], "alerts-1", [row(2)])
    assert sql(env.db_url, "SELECT count(*) FROM buffer_batches") == [(1,)]
