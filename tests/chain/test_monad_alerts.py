"""The Monad example (``examples/monad/monad.yaml``, with its ``gas_spikes`` and
``large_transfers`` detectors) and the route of ``examples/alerts/monad/route.yaml`` on real
Postgres against a real anvil node with a planted gas spike and a planted large ERC-20
transfer: ``cryo_ingest`` -> ``gas_spikes`` (``alert_detector``, ``field_above`` over the
blocks partition, read as Parquet) and ``transfers`` -> ``large_transfers`` (``alert_detector``,
``transfer_threshold`` over the decoded transfers, timed by the blocks) -> ``alert_events`` (the
sink) -> ``alert_route`` -> the Delivery Service -> a local receiver verifying Standard
Webhooks signatures. Each plant is one alert event, one delivery and exactly one accepted
webhook, its event time its block's; the activity's small transfers raise nothing. A backfill
over the same plants in blocks 3 days old records both deliveries ``suppressed`` (the route's
``max_delivery_age`` is 1 h), with the reason, and sends nothing."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml
from _chain_pipeline import ORG, Pipeline, monad_example, run_pipeline, sql

from trace_core.secret_names import org_secret
from trace_core.ssrf import AllowList
from trace_core.testing import MemorySecretStore
from trace_lite.chain.devnode import DevNode, make_activity, mine_empty, wait_receipt
from trace_lite.delivery import DeliveryStore
from trace_lite.delivery_service import DeliveryService
from trace_lite.webhook_sender import WebhookSender
from webhook_receiver import WebhookReceiver

ROOT = Path(__file__).resolve().parents[2]
ROUTE = ROOT / "examples" / "alerts" / "monad" / "route.yaml"
END = 100
SPIKE_TXS = 40  # 40 ETH transfers in one block: 840,000 gas, over the 500,000 threshold
LARGE = 5 * 10**24  # token base units: over large_transfers' 10^24
SECRET = "whsec_" + base64.b64encode(b"chain-alerts-signing-key-32byte!").decode()


def with_alerts(url: str) -> dict[str, Any]:
    """The Monad example with the route job, every pool slot pointed at ``url``."""
    doc = monad_example(url)
    doc["jobs"] |= yaml.safe_load(ROUTE.read_text())["jobs"]
    doc["jobs"]["follow"]["config"]["start"] = END
    return doc


def plant_spike(node: DevNode) -> int:
    """Mine one block holding ``SPIKE_TXS`` ETH transfers; returns its number."""
    rpc = node.rpc()
    sender, receiver = rpc.call("eth_accounts")[:2]
    rpc.call("evm_setAutomine", False)
    sent = [
        rpc.call("eth_sendTransaction", {"from": sender, "to": receiver, "value": hex(i + 1)})
        for i in range(SPIKE_TXS)
    ]
    rpc.call("evm_mine")
    rpc.call("evm_setAutomine", True)
    return int(wait_receipt(rpc, sent[-1])["blockNumber"], 16)


def plant_large_transfer(node: DevNode, token: str) -> tuple[int, str]:
    """Send one ``LARGE`` transfer of ``token`` (the activity's contract: one Transfer log per
    call); returns its block number and transaction hash."""
    rpc = node.rpc()
    sender, receiver = rpc.call("eth_accounts")[:2]
    amount = LARGE.to_bytes(32, "big").hex()
    data = "0x" + receiver[2:].rjust(64, "0") + amount
    tx: str = rpc.call("eth_sendTransaction", {"from": sender, "to": token, "data": data})
    return int(wait_receipt(rpc, tx)["blockNumber"], 16), tx


async def run_backfill(
    db_url: str,
    data_url: str,
    tmp_path: Path,
    node_url: str,
    done: Callable[[WebhookReceiver], bool],
) -> tuple[WebhookReceiver, str]:
    """Deploy the example with the route against ``node_url`` (``_chain_pipeline``), give the
    org an ``ops`` webhook destination (a local receiver), backfill ``[0, END)`` and run the
    pipeline with the alert_events sink and the Delivery Service until ``done(receiver)`` and a
    few quiet rounds more; returns the (stopped) receiver and the alert_events table."""
    receiver = await WebhookReceiver(SECRET).start()
    secrets = MemorySecretStore()
    sender = WebhookSender(secrets, allow=AllowList.of(["127.0.0.1/32"]), timeout_s=5)

    async def deliver(stop: asyncio.Event, p: Pipeline) -> None:
        store = DeliveryStore(p.state)
        service = DeliveryService(store, sender, sender_id="chain-test", batch=5, poll_s=0.05)
        await service.run(stop)

    doc = with_alerts(node_url)
    try:
        async with run_pipeline(
            db_url, data_url, tmp_path, doc, sinks=("alert_events",), background=[deliver]
        ) as p:
            org_id = sql(db_url, "SELECT org_id::text FROM orgs WHERE name = %s", (ORG,))[0][0]
            secret_name = org_secret(org_id, "webhooks.ops")
            await secrets.put(secret_name, SECRET.encode())
            await DeliveryStore(p.state).add_destination(
                org_id=org_id, name="ops", kind="webhook", url=receiver.url, secret_name=secret_name
            )
            await p.trigger("backfill", start=0, end=END)

            def settled() -> bool:
                failed = sql(
                    db_url, "SELECT dag_job, error::text FROM tasks WHERE state = 'failed'"
                )
                assert not failed, failed
                return done(receiver)

            await p.until(settled)
            await asyncio.sleep(0.5)  # and nothing more arrives once the pipeline is quiet
            table = await p.table("alert_events")
    finally:
        await receiver.stop()
    return receiver, table


async def test_a_planted_spike_and_large_transfer_are_one_alert_delivery_webhook_each(
    db_url: str, data_db_url: str, tmp_path: Path, fresh_node: DevNode
) -> None:
    rpc = fresh_node.rpc()
    activity = make_activity(rpc, 30)
    spike = plant_spike(fresh_node)
    large_block, large_tx = plant_large_transfer(fresh_node, activity.contract)
    mine_empty(rpc, END + 5 - rpc.block_number())
    gas = {
        b: int(rpc.call("eth_getBlockByNumber", hex(b), False)["gasUsed"], 16) for b in range(END)
    }
    assert [b for b, g in gas.items() if g >= 500_000] == [spike]  # the one spike

    def block_time(block: int) -> datetime:
        header = rpc.call("eth_getBlockByNumber", hex(block), False)
        return datetime.fromtimestamp(int(header["timestamp"], 16), UTC)

    def settled(receiver: WebhookReceiver) -> bool:
        routed = sql(
            db_url, "SELECT count(*) FROM tasks WHERE dag_job = 'alert_route' "
            "AND state = 'completed'",
        )[0][0]  # fmt: skip
        sent = sql(db_url, "SELECT count(*) FROM alert_deliveries WHERE state = 'sent'")[0][0]
        return bool(routed >= 1 and sent >= 2 and len(receiver.accepted) >= 2)

    receiver, table = await run_backfill(db_url, data_db_url, tmp_path, fresh_node.url, settled)

    # one alert event per plant, at its block's time
    rows = sql(data_db_url, f"SELECT detector, alert_key, event_time, details FROM {table}")
    events = {row[0]: row[1:] for row in rows}
    assert sorted(events) == ["gas_spikes", "large_transfers"]
    spike_key, spike_time, spike_details = events["gas_spikes"]
    assert spike_details["block_number"] == spike
    assert int(spike_details["gas_used"]) == gas[spike]
    assert spike_time == block_time(spike)
    large_key, large_time, large_details = events["large_transfers"]
    assert large_details["amount"] == str(LARGE)
    assert large_details["transaction_hash"] == large_tx
    assert large_time == block_time(large_block)
    # one delivery each, sent; exactly one accepted webhook each, validly signed
    sent = sql(db_url, "SELECT alert_key, state FROM alert_deliveries ORDER BY alert_key")
    assert sent == sorted([(spike_key, "sent"), (large_key, "sent")])
    assert len(receiver.accepted) == 2
    assert all(r.valid and r.webhook_id in receiver.accepted for r in receiver.requests)
    bodies = {
        json.loads(r.body)["alert"]["detector"]: json.loads(r.body)["alert"]
        for r in receiver.requests
    }
    assert bodies["gas_spikes"]["details"]["block_number"] == spike
    assert bodies["large_transfers"]["details"]["amount"] == str(LARGE)
    assert all(b["labels"] == {"chain": "monad"} for b in bodies.values())


async def test_a_backfill_of_old_blocks_records_suppressed_deliveries_and_sends_nothing(
    db_url: str, data_db_url: str, tmp_path: Path, fresh_node: DevNode
) -> None:
    rpc = fresh_node.rpc()
    old = datetime.now(UTC) - timedelta(days=3)
    rpc.call("anvil_setTime", int(old.timestamp()))  # every block after genesis is 3 days old
    activity = make_activity(rpc, 30)
    spike = plant_spike(fresh_node)
    plant_large_transfer(fresh_node, activity.contract)
    mine_empty(rpc, END + 5 - rpc.block_number())
    header = rpc.call("eth_getBlockByNumber", hex(spike), False)
    assert datetime.fromtimestamp(int(header["timestamp"], 16), UTC) < old + timedelta(hours=1)

    def recorded(_: WebhookReceiver) -> bool:
        return bool(sql(db_url, "SELECT count(*) FROM alert_deliveries")[0][0] >= 2)

    receiver, _ = await run_backfill(db_url, data_db_url, tmp_path, fresh_node.url, recorded)
    rows = sql(db_url, "SELECT state, suppressed_reason, attempt FROM alert_deliveries")
    assert len(rows) == 2  # the spike's and the large transfer's
    assert all(state == "suppressed" for state, _, _ in rows)
    assert all("max_delivery_age is 3600 s" in (reason or "") for _, reason, _ in rows)
    assert all(attempt == 0 for _, _, attempt in rows)
    assert sql(db_url, "SELECT count(*) FROM delivery_attempts") == [(0,)]
    assert receiver.requests == []  # nothing sent
