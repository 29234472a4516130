"""``trace sink run`` as a real process: SIGKILLed at each point of a batch (before the data
commit, after it, after the upstream event) and restarted, then run to the end: every dedupe
key stored once, one event per batch, an empty queue; ``/metrics``, ``trace sink status`` and
``trace dlq`` against the same databases; SIGTERM stops it cleanly."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
from e2e_harness import TraceProcs, free_port

from pg_sql import sql as data_sql
from trace_core import wire
from trace_core.lifecycle import RetryPolicy
from trace_core.ports import ObjectStore
from trace_core.testing import MemoryQueue, MemorySigner
from trace_lite.config import LiteSettings
from trace_lite.dags import Dags
from trace_lite.datasets import Datasets, table_name
from trace_lite.dispatcher import Dispatcher, open_pool
from trace_lite.local_store import LocalObjectStore
from trace_lite.sink import EVENT_TYPE, load_dataset
from trace_servers.dag_cli import builtin_operators

ORG = "acme"
BATCHES = 8
ROWS = 40  # per batch; batch i covers rows [20 i, 20 i + 40): each overlaps the next


def dag() -> dict[str, Any]:
    return {
        "name": "alerts",
        "jobs": {
            "detect": {
                "operator": "emit_events",
                "triggers": [{"type": "manual"}],
                "outputs": [
                    {
                        "storage": "postgres_table",
                        "update_strategy": "append",
                        "buffered": True,
                        "unique_key": ["n"],
                        "schema": {"n": "int64", "note": "string"},
                    }
                ],
            }
        },
        "publish": [{"job": "detect", "output": 0, "dataset": "alerts"}],
    }


async def prepare(procs: TraceProcs, data_url: str, store: ObjectStore | None = None) -> str:
    """Deploy the DAG, publish the batches from one attempt (staged in ``store``, the Lite
    store of ``procs`` by default); returns the version's table."""
    settings = LiteSettings.from_env(procs.env())
    store = store or LocalObjectStore(
        settings.object_root, settings.dispatcher_url, settings.object_secret
    )
    pool = await open_pool(procs.db_url, min_size=1, max_size=4)
    try:
        await Datasets(pool, object_store=store).set_member(None, ORG, "alice", ["admin"])
        await Dags(pool, operators=builtin_operators()).deploy(None, ORG, dag())
        d = Dispatcher(
            pool,
            signer=MemorySigner(),
            queue=MemoryQueue("tasks"),
            object_store=store,
            retry=RetryPolicy(),
        )
        (info,) = await d.create_tasks([wire.CreateTaskRequest(operator="noop", org=ORG)])
        c = await d.claim(info.task_id)
        fence = {"task_id": c.task_id, "attempt": c.attempt, "lease_token": c.lease_token}
        prefix = (await d.fetch(c.task_id)).staging_prefix
        for i in range(BATCHES):
            rows = [{"n": n, "note": f"b{i}"} for n in range(20 * i, 20 * i + ROWS)]
            data = b"".join(json.dumps(r).encode() + b"\n" for r in rows)
            key = f"{prefix}buffer/alerts/b{i}.jsonl"
            put = await store.put(key, data)
            batch = wire.BufferBatchIn(f"b{i}", "alerts", key, len(rows), put.size, put.sha256)
            await d.publish_buffer(wire.BufferPublishRequest(**fence, batch=batch))
        ds = await load_dataset(pool, ORG, "alerts")
        assert ds.dataset_version is not None
        return table_name(ds.dataset_version)
    finally:
        await pool.close()


def cli(procs: TraceProcs, *argv: str) -> Any:
    out = subprocess.run(
        [sys.executable, "-m", "trace_servers.cli", *argv],
        env=procs.env(),
        capture_output=True,
        check=True,
        timeout=60,
        cwd=procs.home,
    )
    return json.loads(out.stdout)


def test_sink_process_killed_at_each_point_then_finishes_exactly_once(
    trace_procs: TraceProcs, data_db_url: str
) -> None:
    procs = trace_procs
    plain_env = procs.env
    procs.env = lambda: {**plain_env(), "TRACE_DATA_DATABASE_URL": data_db_url}  # type: ignore[method-assign]
    table = asyncio.run(prepare(procs, data_db_url))
    expected = 20 * (BATCHES - 1) + ROWS

    def stored() -> int:
        exists = data_sql(data_db_url, f"SELECT to_regclass('{table}') IS NOT NULL")[0][0]
        return int(data_sql(data_db_url, f"SELECT count(*) FROM {table}")[0][0]) if exists else 0

    def events() -> int:
        return int(
            procs.scalar("SELECT count(*) FROM task_events WHERE event_type = %s", (EVENT_TYPE,))
        )

    base = ["sink", "run", "--org", ORG, "--visibility-s", "1"]
    for point in ("before_commit", "after_commit", "after_event"):
        proc = procs._spawn("sink", *base, "--kill-at", point)
        procs.wait_until(lambda p=proc: not p.alive(), 60, f"sink killed at {point}")  # type: ignore[misc]
        assert proc.popen.returncode == -9, procs.log_tails()
        # only the process killed after the event emitted (for the batches its receive stored)
        assert (events() > 0) == (point == "after_event")
    port = free_port()
    proc = procs._spawn("sink", *base, "--metrics-port", str(port))
    procs.wait_until(lambda: events() == BATCHES, 60, "one event per batch")

    def queue_empty() -> bool:
        (st,) = cli(procs, "sink", "status", "--org", ORG)
        return bool(st["depth"] == 0 and st["not_forwarded"] == 0)

    procs.wait_until(queue_empty, 60, "the dataset queue drained")
    assert stored() == expected
    distinct = data_sql(data_db_url, f"SELECT count(DISTINCT n), count(*) FROM {table}")[0]
    assert distinct == (expected, expected)
    (st,) = cli(procs, "sink", "status", "--org", ORG)
    assert (st["dataset"], st["depth"], st["dead"]) == ("alerts", 0, 0)
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'trace_sink_queue_depth{dataset="alerts"} 0.0' in body
    assert 'trace_sink_dead_letters{dataset="alerts"} 0.0' in body
    assert cli(procs, "dlq", "ls") == []
    assert cli(procs, "dlq", "show", "--org", ORG, "--dataset", "alerts")["dead_letters"] == []
    assert procs.terminate(proc, 30) == 0
    assert events() == BATCHES  # nothing emitted twice


@pytest.mark.parametrize("target", [[], ["--queue", "tasks"]])
def test_dlq_commands_on_the_task_queue(trace_procs: TraceProcs, target: list[str]) -> None:
    procs = trace_procs
    procs.sql(
        "INSERT INTO queue_messages (queue, body, dead, dead_at, dead_reason) "
        "VALUES ('tasks', '\\x7b7d', true, now(), 'poison')"
    )
    assert cli(procs, "dlq", "ls") == [{"queue": "tasks", "dead": 1}]
    (letter,) = cli(procs, "dlq", "show", *target)["dead_letters"]
    assert (letter["reason"], letter["body"]) == ("poison", "{}")
    with pytest.raises(subprocess.CalledProcessError):
        cli(procs, "dlq", "purge", *target)  # needs --yes
    assert cli(procs, "dlq", "replay", *target)["replayed"] == 1
    assert cli(procs, "dlq", "ls") == []
    procs.sql("UPDATE queue_messages SET dead = true, dead_at = now()")
    assert cli(procs, "dlq", "purge", *target, "--yes")["purged"] == 1
    assert procs.scalar("SELECT count(*) FROM queue_messages") == 0


def test_sink_process_on_sqs_and_s3(
    tmp_path: Path, db_url: str, data_db_url: str, moto_server: Any
) -> None:
    """``TRACE_PROFILE=aws``: the batches are staged in S3, the dataset queue is SQS (created
    with its DLQ by the sink process) on the moto server; the process is SIGKILLed after its
    first data commit, restarted, and every key is stored once with one event per batch."""
    from trace_aws.s3_store import S3ObjectStore

    bucket = f"sink-{uuid.uuid4().hex[:10]}"
    S3ObjectStore.create_bucket(bucket, endpoint_url=moto_server.url)
    aws = {
        "TRACE_PROFILE": "aws",
        "TRACE_AWS_ENDPOINT_URL": moto_server.url,
        "TRACE_S3_BUCKET": bucket,
    }
    home = tmp_path / "home"
    home.mkdir()
    procs = TraceProcs(home, db_url)
    plain_env = procs.env
    procs.env = lambda: {**plain_env(), **aws, "TRACE_DATA_DATABASE_URL": data_db_url}  # type: ignore[method-assign]
    try:
        store = S3ObjectStore(bucket, endpoint_url=moto_server.url)
        table = asyncio.run(prepare(procs, data_db_url, store))
        base = ["sink", "run", "--org", ORG, "--visibility-s", "1"]
        proc = procs._spawn("sink", *base, "--kill-at", "after_commit")
        procs.wait_until(lambda: not proc.alive(), 60, "sink killed after commit")
        assert proc.popen.returncode == -9, procs.log_tails()

        def events() -> int:
            q = "SELECT count(*) FROM task_events WHERE event_type = %s"
            return int(procs.scalar(q, (EVENT_TYPE,)))

        assert events() == 0
        proc = procs._spawn("sink", *base)
        procs.wait_until(lambda: events() == BATCHES, 90, "one event per batch")
        expected = 20 * (BATCHES - 1) + ROWS
        assert data_sql(data_db_url, f"SELECT count(DISTINCT n), count(*) FROM {table}")[0] == (
            expected,
            expected,
        )
        assert procs.terminate(proc, 30) == 0
        assert events() == BATCHES
    finally:
        procs.stop_all()


def test_a_sink_for_the_whole_org_serves_datasets_deployed_after_it_started(
    trace_procs: TraceProcs, data_db_url: str
) -> None:
    procs = trace_procs
    plain_env = procs.env
    procs.env = lambda: {**plain_env(), "TRACE_DATA_DATABASE_URL": data_db_url}  # type: ignore[method-assign]
    proc = procs._spawn("sink", "sink", "run", "--org", ORG)
    procs.wait_until(lambda: "running" in proc.log_path.read_text(), 60, "the sink started")
    table = asyncio.run(prepare(procs, data_db_url))
    q = "SELECT count(*) FROM task_events WHERE event_type = %s"
    procs.wait_until(lambda: procs.scalar(q, (EVENT_TYPE,)) == BATCHES, 60, "every batch")
    expected = 20 * (BATCHES - 1) + ROWS
    assert data_sql(data_db_url, f"SELECT count(*) FROM {table}")[0][0] == expected
    assert procs.terminate(proc, 30) == 0


def publish_rows(
    procs: TraceProcs, store: ObjectStore, batches: dict[str, list[dict[str, Any]]]
) -> None:
    """Publish ``batches`` (key -> rows) of dataset ``alerts`` from one attempt of a new task,
    staged in ``store``."""

    async def go() -> None:
        pool = await open_pool(procs.db_url, min_size=1, max_size=2)
        try:
            d = Dispatcher(
                pool,
                signer=MemorySigner(),
                queue=MemoryQueue("tasks"),
                object_store=store,
                retry=RetryPolicy(),
            )
            (info,) = await d.create_tasks([wire.CreateTaskRequest(operator="noop", org=ORG)])
            c = await d.claim(info.task_id)
            fence = {"task_id": c.task_id, "attempt": c.attempt, "lease_token": c.lease_token}
            prefix = (await d.fetch(c.task_id)).staging_prefix
            for key, rows in batches.items():
                data = b"".join(json.dumps(r).encode() + b"\n" for r in rows)
                put = await store.put(f"{prefix}buffer/alerts/{key}.jsonl", data)
                batch = wire.BufferBatchIn(key, "alerts", put.key, len(rows), put.size, put.sha256)
                await d.publish_buffer(wire.BufferPublishRequest(**fence, batch=batch))
        finally:
            await pool.close()

    asyncio.run(go())


def deploy(procs: TraceProcs, doc: dict[str, Any]) -> None:
    async def go() -> None:
        pool = await open_pool(procs.db_url, min_size=1, max_size=2)
        try:
            await Dags(pool, operators=builtin_operators()).deploy(None, ORG, doc)
        finally:
            await pool.close()

    asyncio.run(go())


def test_on_aws_the_dispatcher_creates_the_queue_at_deploy_and_status_and_dlq_work(
    tmp_path: Path, db_url: str, data_db_url: str, moto_server: Any
) -> None:
    """``TRACE_PROFILE=aws``: the Dispatcher process creates the dataset's SQS queue and DLQ
    when the DAG is deployed (no sink has run); ``trace sink status`` and ``trace dlq
    ls|show|replay|purge`` read and move SQS messages (the dataset queue's and the task
    queue's); a malformed batch dead-lettered by the sink lands once after the schema is
    widened and it is replayed."""
    from trace_aws._boto import client
    from trace_aws.kms_signer import create_signing_key
    from trace_aws.s3_store import S3ObjectStore
    from trace_aws.sqs_queue import SqsQueue

    tag = uuid.uuid4().hex[:10]
    tasks_queue = SqsQueue.create(f"sink-e2e-{tag}", endpoint_url=moto_server.url)
    bucket = f"sink-{tag}"
    S3ObjectStore.create_bucket(bucket, endpoint_url=moto_server.url)
    kms = client("kms", endpoint_url=moto_server.url)
    aws = {
        "TRACE_PROFILE": "aws",
        "TRACE_AWS_ENDPOINT_URL": moto_server.url,
        "TRACE_SQS_QUEUE_URL": tasks_queue.queue_url,
        "TRACE_S3_BUCKET": bucket,
        "TRACE_KMS_CURRENT_KEY": create_signing_key(kms=kms),
        "TRACE_DATA_DATABASE_URL": data_db_url,
    }
    home = tmp_path / "home"
    home.mkdir()
    procs = TraceProcs(home, db_url)
    plain_env = procs.env
    procs.env = lambda: {**plain_env(), **aws}  # type: ignore[method-assign]
    sqs = client("sqs", endpoint_url=moto_server.url)
    try:
        procs.start_dispatcher()
        doc = dag()
        doc["jobs"]["detect"]["outputs"][0]["schema"] = {"n": "int32", "note": "string"}
        deploy(procs, doc)
        uuid_ = procs.scalar("SELECT dataset_uuid::text FROM datasets WHERE name = 'alerts'")
        name = f"buffer-{uuid_}"

        def created() -> bool:
            try:
                sqs.get_queue_url(QueueName=name)
                sqs.get_queue_url(QueueName=f"{name}-dlq")
            except sqs.exceptions.QueueDoesNotExist:
                return False
            return True

        procs.wait_until(created, 30, "the Dispatcher created the queue and its DLQ")
        (st,) = cli(procs, "sink", "status", "--org", ORG)
        assert (st["queue"], st["queue_created"], st["depth"], st["dead"]) == (name, True, 0, 0)
        assert st["oldest_age_s"] is None  # SQS keeps it in CloudWatch only
        store = S3ObjectStore(bucket, endpoint_url=moto_server.url)
        good = {f"g{i}": [{"n": 10 * i + j, "note": "ok"} for j in range(10)] for i in range(3)}
        bad = [{"n": 100, "note": "ok"}, {"n": 2**40, "note": "too big"}, {"n": 101}]
        publish_rows(procs, store, {**good, "bad": bad})

        def events() -> int:
            q = "SELECT count(*) FROM task_events WHERE event_type = %s"
            return int(procs.scalar(q, (EVENT_TYPE,)))

        proc = procs._spawn("sink", "sink", "run", "--org", ORG, "--visibility-s", "2")

        def one_dead() -> bool:
            (s,) = cli(procs, "sink", "status", "--org", ORG)
            return bool(s["dead"] == 1 and s["depth"] == 0 and s["not_forwarded"] == 0)

        procs.wait_until(lambda: events() == 3, 60, "the good batches stored")
        procs.wait_until(one_dead, 60, "the bad batch dead-lettered")
        assert {"queue": name, "dead": 1} in cli(procs, "dlq", "ls")
        (letter,) = cli(procs, "dlq", "show", "--org", ORG, "--dataset", "alerts")["dead_letters"]
        assert "row 1 field n" in letter["reason"] and "out of range for int32" in letter["reason"]
        # the schema is widened (int32 -> int64): the deploy stages a rebuild, which the
        # Dispatcher cuts over (a new version); the dead letter replayed lands once, there
        active = (
            "SELECT p.dataset_version::text FROM dag_pointers p JOIN dags g "
            "ON g.dag_id = p.dag_id AND p.generation = g.active_generation"
        )
        old_table = table_name(procs.scalar(active))
        doc["jobs"]["detect"]["outputs"][0]["schema"] = {"n": "int64", "note": "string"}
        deploy(procs, doc)
        procs.wait_until(
            lambda: procs.scalar("SELECT active_version FROM dags") == 2, 30, "the cutover"
        )
        assert cli(procs, "dlq", "replay", "--org", ORG, "--dataset", "alerts")["replayed"] == 1
        procs.wait_until(lambda: events() == 4, 60, "the replayed batch stored")
        table = table_name(procs.scalar(active))
        assert table != old_table
        assert data_sql(data_db_url, f"SELECT count(*), count(DISTINCT n) FROM {old_table}")[0] == (
            30,
            30,
        )
        assert data_sql(data_db_url, f"SELECT n, note FROM {table} ORDER BY n") == [
            (100, "ok"),
            (101, None),
            (2**40, "too big"),
        ]
        # the task queue's DLQ (the default target) on SQS
        tq = SqsQueue(tasks_queue.queue_url, endpoint_url=moto_server.url)

        async def poison() -> bytes:
            await tq.send([b'{"task_id": "x"}'])
            (m, *_) = await tq.receive(max_messages=1, visibility_timeout=30)
            await tq.dead_letter([(m, "poison")])
            await tq.close()
            return m.body

        body = asyncio.run(poison())
        assert cli(procs, "dlq", "ls") == [{"queue": tasks_queue.name, "dead": 1}]
        (letter,) = cli(procs, "dlq", "show")["dead_letters"]
        assert (letter["reason"], letter["body"]) == ("poison", body.decode())
        with pytest.raises(subprocess.CalledProcessError):
            cli(procs, "dlq", "purge")  # needs --yes
        assert cli(procs, "dlq", "purge", "--yes") == {"queue": tasks_queue.name, "purged": 1}
        assert cli(procs, "dlq", "ls") == []
        assert procs.terminate(proc, 30) == 0
        assert events() == 4
    finally:
        procs.stop_all()


def test_scoped_and_inline_batches_through_the_sdk_over_http_are_stored_once(
    trace_procs: TraceProcs, data_db_url: str
) -> None:
    """The SDK's ``TaskContext.publish_buffer`` against a real Dispatcher process over HTTP:
    staged and inline batches under each kind of scope (cursor, partition_key, range) and
    none; a repeated call, a key reused under another scope, a malformed scope and an oversized
    inline batch; then a retried attempt republishing a range and the stale attempt refused.
    A ``trace sink run`` process stores every row once with the documented dedupe keys."""
    from e2e_harness import PLATFORM_TOKEN

    from trace_core import errors
    from trace_core.sink import Scope, dedupe_key
    from trace_sdk import DispatcherClient
    from trace_sdk._worker import TaskContext

    procs = trace_procs
    plain_env = procs.env
    procs.env = lambda: {**plain_env(), "TRACE_DATA_DATABASE_URL": data_db_url}  # type: ignore[method-assign]
    procs.start_dispatcher()
    deploy(procs, dag())
    # Lite: the Dispatcher process's pass records the dataset's queue as created
    provisioned = "SELECT count(provisioned_at) FROM buffer_queues"
    procs.wait_until(lambda: procs.scalar(provisioned) == 1, 30, "the queue recorded as created")
    task_id = procs.create_task("noop", org=ORG)
    settings = LiteSettings.from_env(procs.env())
    store = LocalObjectStore(settings.object_root, settings.dispatcher_url, settings.object_secret)
    rows = [{"n": n, "note": "r"} for n in range(5)]
    span = {"range": {"start": 0, "end": 100}}

    async def attempt(client: DispatcherClient) -> tuple[TaskContext, str]:
        claim = await client.claim(task_id, "e2e")
        task = await client.fetch(task_id, claim.attempt)
        fence = wire.FenceFields(claim.task_id, claim.attempt, claim.lease_token)
        ctx = TaskContext(task, claim.attempt, client, store, fence, [claim.capability_token])
        return ctx, claim.capability_token

    def refuse(token: str, fence: dict[str, Any]) -> None:
        """Malformed batches over raw HTTP: 422 with the field, nothing recorded."""
        other = {"cursor": "a", "range": span["range"]}
        big = [{"n": i, "note": "x" * 4000} for i in range(70)]
        for batch, field in [
            ({"rows": rows, "scope": {"range": {"start": 5, "end": 1}}}, "batch.scope.range.end"),
            ({"rows": rows, "scope": other}, "batch.scope.range"),
            ({"rows": big}, "batch.rows"),
        ]:
            body = {**fence, "batch": {"key": "x", "dataset": "alerts", **batch}}
            r = procs.request("POST", "/v1/task/buffer-publish", body=body, capability=token)
            assert (r.status, r.json["error"], r.json["field"]) == (
                422,
                "validation_failed",
                field,
            ), r

    async def scenario() -> None:
        client = DispatcherClient(procs.url, platform_token=PLATFORM_TOKEN)
        try:
            ctx1, token1 = await attempt(client)
            await ctx1.publish_buffer("alerts", rows, key="r0", scope=span)  # staged
            other = {"range": {"start": 100, "end": 200}}
            await ctx1.publish_buffer("alerts", rows, key="r1", scope=other, inline=True)
            cursor = {"cursor": "0xab"}
            await ctx1.publish_buffer("alerts", rows[:2], key="c", scope=cursor, inline=True)
            part = {"partition_key": "2026-12-01"}
            await ctx1.publish_buffer("alerts", rows[:1], key="p", scope=part, inline=True)
            await ctx1.publish_buffer("alerts", rows, key="none", inline=True)
            again = await ctx1.publish_buffer("alerts", rows, key="r1", scope=other, inline=True)
            assert again.duplicate
            with pytest.raises(errors.IdempotencyMismatch):
                await ctx1.publish_buffer("alerts", rows, key="r1", scope=span, inline=True)
            fence = {"task_id": task_id, "attempt": 1, "lease_token": ctx1._fence.lease_token}
            await asyncio.to_thread(refuse, token1, fence)
            assert procs.scalar("SELECT count(*) FROM buffer_batches") == 5
            for _ in range(200):  # the first attempt's lease lapses (no heartbeat); reclaim
                try:
                    ctx2, _token = await attempt(client)
                    break
                except errors.TraceError:
                    await asyncio.sleep(0.1)
            else:
                raise AssertionError("the task was never claimable again")
            assert ctx2.attempt == 2
            extra = [*rows, {"n": 5, "note": "new"}]
            await ctx2.publish_buffer("alerts", extra, key="r0-retry", scope=span, inline=True)
            with pytest.raises(errors.LeaseLost):  # the stale attempt publishes nothing
                await ctx1.publish_buffer("alerts", [{"n": 99}], key="stale", inline=True)
        finally:
            await client.close()

    asyncio.run(scenario())
    q = "SELECT count(*) FROM task_events WHERE event_type = %s"
    proc = procs._spawn("sink", "sink", "run", "--org", ORG)
    procs.wait_until(lambda: procs.scalar(q, (EVENT_TYPE,)) == 6, 60, "one event per batch")
    table = table_name(
        procs.scalar(
            "SELECT p.dataset_version::text FROM dag_pointers p JOIN dags g "
            "ON g.dag_id = p.dag_id AND p.generation = g.active_generation"
        )
    )
    per_batch = data_sql(
        data_db_url, f"SELECT _batch_key, count(*) FROM {table} GROUP BY 1 ORDER BY 1"
    )
    assert per_batch == [("c", 2), ("none", 5), ("p", 1), ("r0", 5), ("r0-retry", 1), ("r1", 5)]
    uuid_ = procs.scalar("SELECT dataset_uuid::text FROM datasets WHERE name = 'alerts'")
    stored = data_sql(
        data_db_url, f"SELECT n, encode(_dedupe_key, 'hex') FROM {table} WHERE _batch_key = 'r0'"
    )
    assert sorted(stored) == [
        (n, dedupe_key(task_id, uuid_, Scope(range=(0, 100)), [n])) for n in range(5)
    ]
    assert procs.terminate(proc, 30) == 0
    assert procs.scalar(q, (EVENT_TYPE,)) == 6
