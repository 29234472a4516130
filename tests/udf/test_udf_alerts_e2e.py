"""A UDF detector end to end over real processes (Dispatcher, UDF runner, sink, Lite worker,
Delivery Service, a local webhook receiver that verifies signatures):
``examples/udf/python/transfer_bursts`` deployed with ``trace udf deploy``, its DAG
(``dag.yaml``) deployed and triggered with transfer rows. The UDF emits ``alert_events`` rows
(``trace_udf.alerts.alert_event``) to the buffered, multi-writer dataset; the sink stores them
and its ``rows_committed`` event runs the built-in ``alert_route``, which records one delivery;
``trace delivery run`` sends it. The UDF's first attempt fails after its rows were published:
the retry re-publishes the same batch key, so the alert is still one stored event, one delivery
and exactly one accepted, validly signed webhook at the receiver."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_delivery_e2e import ThreadedReceiver

from conftest import UdfProcs, buffered_output, py_bundle
from trace_core.alert_rules import alert_key
from trace_core.delivery import delivery_key, webhook_id
from trace_lite.dag_runs import DagRuns
from trace_lite.dags import Dags
from trace_lite.dispatcher import open_pool
from trace_servers.dag_cli import builtin_operators

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "udf" / "python" / "transfer_bursts"
SENDER = "0x" + "aa" * 20
FAST = "0,0.1,0.1,0.1,0.1,0.1,0.1,0.1,0.1,0.1"
#: Attempt 1 publishes its rows, then its answer is refused (an event key the task API
#: refuses): the attempt fails after publishing and the retry publishes the same batch.
FAIL_AFTER_PUBLISH = """

_handler = handler


def handler(ctx):
    out = _handler(ctx)
    if ctx.event.attempt == 1:
        ctx.emit_event("bursts.done", {}, key="not a valid key!")
    return out
"""


@pytest.fixture
def receiver_thread() -> Iterator[ThreadedReceiver]:
    t = ThreadedReceiver()
    yield t
    t.close()


def transfer(i: int, sender: str, when: datetime) -> dict[str, Any]:
    return {
        "transaction_hash": f"0x{i:064x}",
        "log_index": 0,
        "from_address": sender,
        "block_number": 100 + i,
        "block_timestamp": when.isoformat(),
    }


def deploy_and_trigger(procs: UdfProcs, dag: dict[str, Any], payload: dict[str, Any]) -> None:
    async def run() -> None:
        pool = await open_pool(procs.db_url, min_size=1, max_size=2)
        try:
            await Dags(pool, operators=builtin_operators()).deploy(None, "default", dag)
            await DagRuns(pool).trigger(None, "default", dag["name"], "detect", payload=payload)
        finally:
            await pool.close()

    asyncio.run(run())


def test_a_udf_detector_writes_alert_events_that_are_routed_and_delivered_once(
    udf_dag_procs: UdfProcs, receiver_thread: ThreadedReceiver, tmp_path: Path
) -> None:
    procs = udf_dag_procs
    procs.org_id()  # the default org
    receiver = receiver_thread.start("whsec_" + "A" * 44)
    dest = procs.cli(
        "alerts", "destination-add", "--org", "default", "--name", "ops",
        "--url", receiver.url, "--allow", "127.0.0.1/32",
    )  # fmt: skip
    receiver.secret = dest["signing_secret"]

    src = tmp_path / "transfer_bursts"
    shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns("dist", "__pycache__"))
    with (src / "handler.py").open("a") as f:
        f.write(FAIL_AFTER_PUBLISH)
    bundle = procs.deploy_bundle(src)
    dag = yaml.safe_load((EXAMPLE / "dag.yaml").read_text())
    dag["jobs"]["detect"]["config"]["bundle"] = bundle
    dag["jobs"]["detect"]["max_attempts"] = 3
    procs.start_worker()  # the route (a built-in operator of the Lite worker)
    now = datetime.now(UTC).replace(microsecond=0)
    rows = [transfer(i, SENDER, now - timedelta(seconds=10 - i)) for i in range(3)]
    rows.append(transfer(3, "0x" + "bb" * 20, now))  # one transfer: no burst
    deploy_and_trigger(procs, dag, {"rows": rows})

    key = alert_key("transfer_bursts", [SENDER, rows[0]["transaction_hash"], 0])
    delivery = delivery_key(key, "bursts", dest["destination_id"])
    procs._spawn(
        "delivery", "delivery", "run", "--retry-schedule", FAST, "--poll-s", "0.1",
        "--allow", "127.0.0.1/32", "--id", "sender",
    )  # fmt: skip
    procs.wait_until(
        lambda: procs.sql("SELECT state FROM alert_deliveries") == [("sent",)],
        120,
        "the UDF's alert delivered",
    )

    # the UDF: attempt 1 published and failed, attempt 2 re-published the same key (a no-op)
    [detect] = procs.completed_tasks("detect")
    assert procs.attempts(detect) == [(1, "failed", "udf_invalid_response"), (2, "succeeded", None)]
    assert procs.buffer_batches(detect) == [("bursts.0", 1, 1)]
    # one stored event: the burst's key, its latest transfer's block time, the UDF's fields
    stored = procs.stored_rows("alert_events", ["alert_key", "detector", "event_time", "severity"])
    assert stored == [(key, "transfer_bursts", now - timedelta(seconds=8), "error")]
    # one delivery, sent; exactly one accepted, validly signed webhook under its one id
    assert procs.sql("SELECT alert_key, route, state FROM alert_deliveries") == [
        (key, "bursts", "sent")
    ]
    assert receiver.accepted == [webhook_id(delivery)]
    assert [r.valid for r in receiver.requests] == [True]
    body = json.loads(receiver.requests[0].body)
    assert body["alert_key"] == key and body["route"] == "bursts"
    assert body["alert"]["summary"] == f"3 transfers from {SENDER}"
    assert body["alert"]["labels"] == {"team": "treasury"}
    assert body["alert"]["details"] == {"from_address": SENDER, "transfers": 3}
    events = procs.cli("alerts", "ls", "--org", "default")
    assert {e["alert_key"]: e["deliveries"] for e in events} == {key: {"sent": 1}}


#: A UDF of another DAG writing alert_events (and its own dataset).
ROGUE = """
    from trace_udf import Context
    from trace_udf.alerts import alert_event

    def handler(ctx: Context) -> None:
        row = alert_event("rogue", ["x"], event_time="2026-12-01T00:00:00Z", summary="rogue",
                          severity="critical")
        ctx.emit_rows("alert_events", [row], key="rogue")
        ctx.emit_rows("rogue_out", [{"n": 1}], key="mine")
"""


def test_a_udf_of_another_dag_cannot_write_alert_events(
    udf_dag_procs: UdfProcs, tmp_path: Path
) -> None:
    procs = udf_dag_procs
    procs.org_id()
    src = tmp_path / "transfer_bursts"
    shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns("dist", "__pycache__"))
    dag = yaml.safe_load((EXAMPLE / "dag.yaml").read_text())
    dag["jobs"]["detect"]["config"]["bundle"] = procs.deploy_bundle(src)
    del dag["jobs"]["route"]
    now = datetime.now(UTC)
    rows = [transfer(i, SENDER, now) for i in range(3)]
    deploy_and_trigger(procs, dag, {"rows": rows})  # alert_events is this DAG's
    mine = [(alert_key("transfer_bursts", [SENDER, rows[0]["transaction_hash"], 0]),)]
    procs.wait_until(
        lambda: procs.stored_rows("alert_events", ["alert_key"]) == mine, 90, "its event"
    )
    rogue = procs.put_bundle(py_bundle("rogue", ROGUE))
    other = {
        "name": "rogue",
        "jobs": {
            "detect": {
                "operator": "udf", "runtime": "lambda", "config": {"bundle": rogue},
                "triggers": [{"type": "manual"}],
                "outputs": buffered_output({"n": "int64"}, ["n"]),
            }
        },
        "publish": [{"job": "detect", "output": 0, "dataset": "rogue_out"}],
    }  # fmt: skip
    deploy_and_trigger(procs, other, {})

    def failed() -> list[Any]:
        return procs.sql(
            "SELECT t.task_id::text, t.state, t.error::text FROM tasks t "
            "WHERE t.dag_job = 'detect' AND t.state = 'failed'"
        )

    # its alert_events batch is refused at publish (403: the dataset is another DAG's), so
    # its attempts fail and nothing of it is recorded, forwarded, dead-lettered or stored
    [(task_id, _, message)] = procs.wait_until(failed, 90, "the rogue task failed")
    assert "produced by another DAG" in str(message)
    assert procs.buffer_batches(task_id) == []
    attempts = procs.attempts(task_id)
    assert attempts and all(outcome == "failed" for _, outcome, _ in attempts)
    shown = procs.cli("dlq", "show", "--org", "default", "--dataset", "alert_events")
    assert list(shown["dead_letters"]) == []
    assert procs.stored_rows("alert_events", ["alert_key"]) == mine
