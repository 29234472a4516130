"""Alerting end to end as real processes: ``examples/alerts/watch.yaml`` deployed over HTTP, a
destination created over HTTP (SSRF refused first; the secret never answered), the Dispatcher,
a Lite worker running ``alert_detector`` -> ``alert_route``, ``trace sink run`` for
``alert_events`` and ``trace delivery run``, against a local receiver that verifies Standard
Webhooks signatures. The worker is SIGKILLed after ``alert_route`` recorded the delivery and
before it completed; the Delivery Service is SIGKILLed right after the receiver accepted the
webhook, before it recorded that: the alert is still one event, one delivery and exactly one
accepted webhook, every request carrying the delivery's one ``webhook-id``."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from e2e_harness import TraceProcs
from test_delivery_e2e import ThreadedReceiver

from trace_core.alert_rules import alert_key
from trace_core.delivery import delivery_key, webhook_id
from trace_lite.datasets import Datasets
from trace_lite.dispatcher import open_pool
from trace_lite.users import LocalUserIssuer

ORG = "acme"
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "alerts" / "watch.yaml"
SECRET = "whsec_" + base64.b64encode(b"e2e-alerts-signing-key-32-bytes!").decode()
WATCHED = "0x" + "ab" * 20
FAST = "0,0.1,0.1,0.1,0.1,0.1,0.1,0.1,0.1,0.1"


@pytest.fixture
def receiver_thread() -> Any:
    t = ThreadedReceiver()
    yield t
    t.close()


def transfer(i: int, value: int, when: datetime) -> dict[str, Any]:
    return {
        "transaction_hash": f"0x{i:064x}",
        "log_index": 0,
        "from_address": "0x" + "01" * 20,
        "to_address": WATCHED,
        "value": str(value),
        "block_timestamp": when.isoformat(),
    }


def cli(t: TraceProcs, *argv: str) -> Any:
    done = subprocess.run(
        [sys.executable, "-m", "trace_servers.cli", *argv],
        env=t.env(),
        cwd=t.home,
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr.decode()
    return json.loads(done.stdout)


def route_task(t: TraceProcs) -> tuple[str, int] | None:
    rows = t.sql("SELECT state, attempt FROM tasks WHERE dag_job = 'route'")
    return rows[0] if rows else None


@pytest.mark.trace_lease(2)
def test_a_dag_alert_is_received_once_across_kill_9_of_the_worker_and_the_sender(
    trace_procs: TraceProcs,
    data_db_url: str,
    receiver_thread: ThreadedReceiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    t = trace_procs
    base_env = t.env
    extra = {"TRACE_DATA_DATABASE_URL": data_db_url, "TRACE_DELIVERY_ALLOW": "127.0.0.1/32"}
    monkeypatch.setattr(t, "env", lambda: {**base_env(), **extra})

    async def members() -> None:
        pool = await open_pool(t.db_url, min_size=1, max_size=2)
        try:
            await Datasets(pool).set_member(None, ORG, "ada", ["admin", "dag_deployer"])
        finally:
            await pool.close()

    asyncio.run(members())
    t.start_dispatcher()
    receiver = receiver_thread.start(SECRET)
    auth = {"Authorization": f"Bearer {LocalUserIssuer.init(t.key_dir).token('ada')}"}
    base = f"/v1/orgs/{ORG}/alert-destinations"

    # the destination, over HTTP: the metadata address is refused, the allow-listed receiver
    # is accepted; no answer carries the secret
    refused = t.request(
        "POST", base, headers=auth,
        body={"name": "ops", "url": "http://169.254.169.254/hook", "signing_secret": SECRET},
    )  # fmt: skip
    assert refused.status == 422 and refused.json["field"] == "url", refused
    created = t.request(
        "POST", base, headers=auth,
        body={"name": "ops", "url": receiver.url, "signing_secret": SECRET},
    )  # fmt: skip
    assert created.status == 201, created
    assert b"whsec_" not in created.raw
    destination_id = created.json["destination_id"]

    # the example DAG, deployed over HTTP; its route's first attempt hangs after recording
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["jobs"]["route"]["config"]["hang_first_s"] = 60
    deployed = t.request("POST", f"/v1/orgs/{ORG}/dags", headers=auth, body={"spec": doc})
    assert deployed.status == 201, deployed
    t._spawn("sink", "sink", "run", "--org", ORG, "--dataset", "alert_events")
    worker = t.start_worker()
    now = datetime.now(UTC)
    rows = [transfer(1, 5_000_000, now), transfer(2, 10, now), transfer(3, 7_000_000, now)]
    rows[2]["block_timestamp"] = (now - timedelta(days=2)).isoformat()  # too old to send
    run = t.request(
        "POST", f"/v1/orgs/{ORG}/dags/watch/jobs/detect/trigger", headers=auth,
        body={"payload": {"rows": rows}},
    )  # fmt: skip
    assert run.status == 201, run

    # 1. the worker dies after alert_route recorded the deliveries, before it completed
    t.wait_until(
        lambda: (
            route_task(t) == ("running", 1)
            and t.scalar("SELECT count(*) FROM alert_deliveries") == 2
        ),
        90,
        "alert_route's first attempt recorded its deliveries",
    )
    t.kill9(worker)
    t.start_worker()
    t.wait_until(lambda: route_task(t) == ("completed", 2), 90, "alert_route retried and done")
    key = alert_key("large_transfers", [f"0x{1:064x}", 0])
    old_key = alert_key("large_transfers", [f"0x{3:064x}", 0])
    assert sorted(t.sql("SELECT alert_key, state FROM alert_deliveries")) == sorted(
        [(key, "due"), (old_key, "suppressed")]
    )

    # 2. the sender dies right after the receiver accepted the webhook, before recording it
    args = ["delivery", "run", "--retry-schedule", FAST, "--lease-s", "2", "--poll-s", "0.1"]
    killed = t._spawn("delivery", *args, "--kill-at", "after_send", "--id", "killed")
    t.wait_until(lambda: not killed.alive(), 60, "the sender killed after a send")
    assert receiver.accepted == [webhook_id(delivery_key(key, "pages", destination_id))]
    t._spawn("delivery", *args, "--id", "again")
    t.wait_until(
        lambda: (
            t.scalar("SELECT state FROM alert_deliveries WHERE alert_key = %s", (key,)) == "sent"
        ),
        60,
        "the delivery recorded sent",
    )

    # one event, one delivery sent, exactly one accepted webhook; every request signed and
    # carrying the delivery's one id; the old event recorded, never sent
    assert receiver.accepted == [webhook_id(delivery_key(key, "pages", destination_id))]
    assert len(receiver.requests) >= 2  # sent again after the sender's crash
    assert {r.webhook_id for r in receiver.requests} == set(receiver.accepted)
    assert all(r.valid for r in receiver.requests)
    body = json.loads(receiver.requests[0].body)
    assert body["alert_key"] == key and body["route"] == "pages"
    assert "transfer of 5000000" in body["alert"]["summary"]
    assert body["alert"]["labels"] == {"team": "treasury"}
    events = cli(t, "alerts", "ls", "--org", ORG)
    assert {e["alert_key"]: e["deliveries"] for e in events} == {
        key: {"sent": 1},
        old_key: {"suppressed": 1},
    }
    # the destination commands: listed without secrets, then deleted (gone from the API)
    (listed,) = cli(t, "alerts", "destination-ls", "--org", ORG)
    assert listed["name"] == "ops" and "whsec_" not in json.dumps(listed)
    removed = cli(t, "alerts", "destination-rm", "--org", ORG, "--name", "ops")
    assert removed == {"deleted": "ops", "deliveries_disabled": 0}
    assert t.request("GET", f"{base}/ops", headers=auth).status == 404
