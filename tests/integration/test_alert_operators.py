"""The alert operators in a deployed DAG on real Postgres (state and data databases):
``transfers`` (a buffered dataset) -> ``alert_detector`` -> ``alert_events`` (buffered,
multi-writer) -> ``alert_route`` -> ``alert_deliveries``, driven through the real buffer
forwarder, sinks, DAG fan-out and an in-process worker. Retried attempts (each operator's
first attempt does all its work, then fails) raise each alert once and record each delivery
once; a stale attempt records nothing; old events are recorded suppressed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import attrs
import psycopg
import psycopg.sql
import pytest

from pg_sql import sql
from trace_core import errors, wire
from trace_core.alert_rules import (
    ALERT_EVENTS_SCHEMA,
    AlertEvent,
    Route,
    alert_key,
    plan_deliveries,
)
from trace_core.dag import OperatorInfo
from trace_core.lifecycle import RetryPolicy
from trace_core.testing import MemoryQueue, MemorySigner
from trace_lite.alert_inputs import PgAlertInputs
from trace_lite.buffer_forwarder import BufferForwarder, queue_name, topic
from trace_lite.dag_control import DagControl
from trace_lite.dag_runs import DagRuns
from trace_lite.dags import Dags
from trace_lite.datasets import Datasets
from trace_lite.delivery import DeliveryStore
from trace_lite.dispatcher import Dispatcher, open_pool
from trace_lite.local_store import LocalObjectStore
from trace_lite.pg_queue import PgQueue
from trace_lite.sink import Sink, load_dataset
from trace_lite.task_surface import InProcessTaskSurface
from trace_sdk import BUILTIN_OPERATORS, Operator, TaskContext, Worker
from trace_sdk.alerts import make_alert_detector, make_alert_route

ORG = "acme"
WATCHED = "0x" + "ab" * 20
OTHER = "0x" + "01" * 20


def dag_doc(*, max_age: str = "1h") -> dict[str, Any]:
    return {
        "name": "watch",
        "jobs": {
            "transfers": {
                "operator": "publish_rows",
                "triggers": [{"type": "manual"}],
                "outputs": [
                    {
                        "storage": "postgres_table",
                        "update_strategy": "append",
                        "buffered": True,
                        "unique_key": ["transaction_hash", "log_index"],
                        "schema": {
                            "transaction_hash": "string",
                            "log_index": "int32",
                            "from_address": "string",
                            "to_address": "string",
                            "value": "uint256",
                            "block_timestamp": "timestamp",
                        },
                    }
                ],
            },
            "detect": {
                "operator": "alert_detector",
                "config": {
                    "name": "big_transfers",
                    "rule": "transfer_threshold",
                    "min_amount": "1000000",
                    "addresses": [WATCHED],
                    "severity": "error",
                    "labels": {"team": "treasury"},
                },
                "inputs": [{"from": {"job": "transfers", "output": 0}}],
                "outputs": [
                    {
                        "storage": "postgres_table",
                        "update_strategy": "append",
                        "buffered": True,
                        "multi_writer": True,
                        "unique_key": ["alert_key"],
                        "schema": dict(ALERT_EVENTS_SCHEMA),
                    }
                ],
            },
            "route": {
                "operator": "alert_route",
                "config": {
                    "routes": [
                        {
                            "name": "pages",
                            "destinations": ["ops", "audit"],
                            "min_severity": "error",
                            "max_delivery_age": max_age,
                        },
                        {"name": "infra", "destinations": ["ops"], "labels": {"team": "infra"}},
                    ]
                },
                "inputs": [{"from": {"job": "detect", "output": 0}}],
            },
        },
        "publish": [
            {"job": "transfers", "output": 0, "dataset": "transfers"},
            {"job": "detect", "output": 0, "dataset": "alert_events"},
        ],
    }


def transfer(i: int, value: int, *, when: datetime, to: str = WATCHED) -> dict[str, Any]:
    return {
        "transaction_hash": f"0x{i:064x}",
        "log_index": i % 4,
        "from_address": OTHER,
        "to_address": to,
        "value": str(value),
        "block_timestamp": when.isoformat(),
    }


async def publish_rows(ctx: TaskContext) -> dict[str, Any] | None:
    """Publishes ``payload.rows`` to the ``transfers`` dataset (a stand-in for a decoder)."""
    await ctx.publish_buffer("transfers", list(ctx.payload["rows"]), key="rows", inline=True)
    return {"rows": len(ctx.payload["rows"])}


def fail_first_attempt_after(op: Operator) -> Operator:
    """``op``, whose first attempt does all its work and then fails (a crash after the side
    effects, before the completion)."""

    async def wrapped(ctx: TaskContext) -> dict[str, Any] | None:
        out = await op(ctx)
        if ctx.attempt == 1:
            raise RuntimeError("failing after the work, on purpose")
        return out

    return wrapped


@attrs.define
class Stack:
    db_url: str
    state: Any
    data: Any
    dispatcher: Dispatcher
    runs: DagRuns
    deliveries: DeliveryStore
    inputs: PgAlertInputs
    forwarder: BufferForwarder
    store: LocalObjectStore
    operators: dict[str, Operator]
    queues: dict[str, PgQueue] = attrs.field(factory=dict)

    def queue(self, name: str) -> PgQueue:
        if name not in self.queues:
            self.queues[name] = PgQueue(self.state, name, max_receives=5)
        return self.queues[name]

    async def sink(self, dataset: str) -> Sink:
        ds = await load_dataset(self.state, ORG, dataset)
        return Sink(
            state_pool=self.state,
            data_pool=self.data,
            object_store=self.store,
            queue=self.queue(queue_name(ds.dataset_uuid)),
            org=ORG,
            dataset=dataset,
        )

    async def settle(self, until: Any) -> None:
        """Run worker, forwarder, sinks and fan-out until ``until()`` holds."""
        queue = self.dispatcher.queue
        worker = Worker(
            surface=InProcessTaskSurface(self.dispatcher),
            queue=queue,
            operators=self.operators,
            store=self.store,
            wait_s=0.05,
        )
        stop = asyncio.Event()
        background = asyncio.create_task(self.dispatcher.run_background(stop, reap_every_s=0.05))
        running = asyncio.create_task(worker.run(stop))
        sinks = [await self.sink("transfers"), await self.sink("alert_events")]
        try:
            async with asyncio.timeout(60):
                while not until():
                    await self.forwarder.drain()
                    for s in sinks:
                        await s.process_once()
                    await self.runs.fan_out_once()
                    failed = sql(self.db_url, "SELECT error::text FROM tasks WHERE state='failed'")
                    assert not failed, failed
                    await asyncio.sleep(0.05)
        except TimeoutError:
            tasks = sql(self.db_url, "SELECT dag_job, state, attempt, error::text FROM tasks")
            outbox = sql(self.db_url, "SELECT topic, state, last_error FROM outbox")
            raise AssertionError(f"tasks {tasks}; outbox {outbox}") from None
        finally:
            stop.set()
            await asyncio.gather(background, running)


@pytest.fixture
async def stack(db_url: str, data_db_url: str, tmp_path: Path) -> AsyncIterator[Stack]:
    state = await open_pool(db_url, min_size=2, max_size=10)
    data = await open_pool(data_db_url, min_size=1, max_size=4)
    store = LocalObjectStore(tmp_path / "objects", "http://127.0.0.1:1", b"s" * 32)
    dispatcher = Dispatcher(
        state,
        signer=MemorySigner(),
        queue=MemoryQueue("tasks"),
        object_store=store,
        retry=RetryPolicy(max_attempts=3, base_s=0.0),
        rand=lambda: 0.5,
    )
    await Datasets(state, object_store=store).set_member(None, ORG, "alice", ["admin"])
    names = [*BUILTIN_OPERATORS, "publish_rows", "alert_detector", "alert_route"]
    await Dags(state, operators={n: OperatorInfo(n) for n in names}).deploy(None, ORG, dag_doc())
    deliveries = DeliveryStore(state)
    org_id = sql(db_url, "SELECT org_id::text FROM orgs WHERE name = %s", (ORG,))[0][0]
    for name in ("ops", "audit"):
        await deliveries.add_destination(
            org_id=org_id, name=name, kind="webhook", url=f"https://{name}.example.com/hook",
            secret_name=f"trace/org/{org_id}/webhooks.{name}",
        )  # fmt: skip
    inputs = PgAlertInputs(state, data)
    s = Stack(
        db_url=db_url,
        state=state,
        data=data,
        dispatcher=dispatcher,
        runs=DagRuns(state),
        deliveries=deliveries,
        inputs=inputs,
        forwarder=BufferForwarder(
            state,
            lambda u: s.queue(queue_name(u)),
            topics=[topic("transfers"), topic("alert_events")],
        ),
        store=store,
        operators={
            **BUILTIN_OPERATORS,
            "publish_rows": publish_rows,
            "alert_detector": fail_first_attempt_after(make_alert_detector(inputs)),
            "alert_route": fail_first_attempt_after(make_alert_route(inputs, deliveries)),
        },
    )
    try:
        yield s
    finally:
        for q in s.queues.values():
            await q.close()
        await state.close()
        await data.close()


def deliveries(db_url: str) -> list[tuple[Any, ...]]:
    return sql(
        db_url,
        "SELECT d.route, t.name, d.state, d.alert_key FROM alert_deliveries d "
        "JOIN alert_destinations t USING (destination_id) ORDER BY 1, 2, 4",
    )


def finished(db_url: str, job: str) -> bool:
    rows = sql(db_url, "SELECT state FROM tasks WHERE dag_job = %s", (job,))
    return bool(rows) and all(state == "completed" for (state,) in rows)


async def test_rows_become_one_alert_and_one_delivery_per_destination_despite_retries(
    stack: Stack,
) -> None:
    now = datetime.now(UTC)
    rows = [
        transfer(1, 5_000_000, when=now),  # alert
        transfer(2, 10, when=now),  # too small
        transfer(3, 9_000_000, when=now, to=OTHER),  # not a watched address
        transfer(4, 1_000_000, when=now - timedelta(days=3)),  # alert, too old to send
    ]
    await stack.runs.trigger(None, ORG, "watch", "transfers", payload={"rows": rows})
    await stack.settle(lambda: finished(stack.db_url, "route"))
    # every detector and router task ran twice: its first attempt did the work, then failed
    attempts = sql(
        stack.db_url,
        "SELECT dag_job, attempt FROM tasks WHERE dag_job IN ('detect', 'route') ORDER BY 1",
    )
    assert attempts == [("detect", 2), ("route", 2)]
    key1 = alert_key("big_transfers", [f"0x{1:064x}", 1])
    key4 = alert_key("big_transfers", [f"0x{4:064x}", 0])
    # one alert event per alert key in the alert_events table
    ds = await load_dataset(stack.state, ORG, "alert_events")
    assert ds.dataset_version is not None
    async with stack.data.connection() as conn:
        cur = await conn.execute(
            psycopg.sql.SQL("SELECT alert_key, severity, labels FROM {}").format(
                psycopg.sql.Identifier("data", f"dsv_{ds.dataset_version.replace('-', '')}")
            )
        )
        stored = await cur.fetchall()
    assert sorted(k for k, _, _ in stored) == sorted([key1, key4])
    assert {(s, lb["team"]) for _, s, lb in stored} == {("error", "treasury")}
    # route "pages" to ops and audit; route "infra" selects team=infra labels: nothing
    assert sorted(deliveries(stack.db_url)) == sorted(
        [
            ("pages", "audit", "due", key1),
            ("pages", "audit", "suppressed", key4),
            ("pages", "ops", "due", key1),
            ("pages", "ops", "suppressed", key4),
        ]
    )
    reasons = sql(
        stack.db_url, "SELECT suppressed_reason FROM alert_deliveries WHERE state='suppressed'"
    )
    assert all("max_delivery_age" in r for (r,) in reasons)
    # the same rows again (a rerun over the same blocks): new tasks, no new delivery
    await stack.runs.trigger(None, ORG, "watch", "transfers", payload={"rows": rows})
    await stack.settle(
        lambda: (
            len(sql(stack.db_url, "SELECT 1 FROM tasks WHERE dag_job = 'route'")) == 2
            and finished(stack.db_url, "route")
        )
    )
    assert len(deliveries(stack.db_url)) == 4


async def test_a_stale_attempt_records_no_delivery_and_reads_no_rows(stack: Stack) -> None:
    now = datetime.now(UTC)
    await stack.runs.trigger(
        None, ORG, "watch", "transfers", payload={"rows": [transfer(1, 2_000_000, when=now)]}
    )
    await stack.settle(lambda: finished(stack.db_url, "route"))
    ((task_id, payload),) = sql(
        stack.db_url, "SELECT task_id::text, payload FROM tasks WHERE dag_job = 'route'"
    )
    event = AlertEvent(alert_key("x", [1]), now, "s", "critical", {})
    planned = plan_deliveries([event], [Route("late", ("ops",))])
    before = deliveries(stack.db_url)
    for attempt in (1, 2):  # the failed first attempt, and the completed second
        with pytest.raises(errors.LeaseLost):
            await stack.deliveries.record_planned(task_id, attempt, planned)
        with pytest.raises(errors.LeaseLost):
            await stack.inputs.rows(task_id, attempt, payload["event"])
    assert deliveries(stack.db_url) == before


async def test_routing_to_a_destination_the_org_lacks_fails_and_records_nothing(
    stack: Stack,
) -> None:
    now = datetime.now(UTC)
    (info,) = await stack.dispatcher.create_tasks(
        [wire.CreateTaskRequest(operator="noop", org=ORG)]
    )
    claim = await stack.dispatcher.claim(info.task_id)
    event = AlertEvent(alert_key("x", [1]), now, "s", "critical", {})
    planned = plan_deliveries([event], [Route("r", ("ops", "nosuch"))])
    with pytest.raises(errors.NotFound) as exc:
        await stack.deliveries.record_planned(claim.task_id, claim.attempt, planned)
    assert "nosuch" in exc.value.message
    assert deliveries(stack.db_url) == []
    # and an event that is not a rows_committed event is refused by the input reader
    with pytest.raises(errors.ValidationFailed):
        await stack.inputs.rows(claim.task_id, claim.attempt, {"type": "range", "payload": {}})


async def test_a_rollback_during_pending_deliveries_cancels_none_of_them(stack: Stack) -> None:
    now = datetime.now(UTC)
    rows = [transfer(i, 2_000_000 + i, when=now) for i in range(1, 4)]
    await stack.runs.trigger(None, ORG, "watch", "transfers", payload={"rows": rows})
    await stack.settle(lambda: finished(stack.db_url, "route"))
    before = sql(stack.db_url, "SELECT delivery_id::text, state FROM alert_deliveries ORDER BY 1")
    assert len(before) == 6 and {s for _, s in before} == {"due"}
    # a new version, then a rollback to the first: the DAG's work is canceled, not deliveries
    names = [*BUILTIN_OPERATORS, "publish_rows", "alert_detector", "alert_route"]
    dags = Dags(stack.state, operators={n: OperatorInfo(n) for n in names})
    await dags.deploy(None, ORG, dag_doc(max_age="2h"))
    rolled = await DagControl(stack.state).rollback(None, ORG, "watch")
    assert (rolled.from_version, rolled.version) == (2, 1)
    assert (
        sql(stack.db_url, "SELECT delivery_id::text, state FROM alert_deliveries ORDER BY 1")
        == before
    )
    leased = await stack.deliveries.lease(10, sender="after-rollback")
    assert sorted(lease.fence.delivery_id for lease in leased) == [d for d, _ in before]
