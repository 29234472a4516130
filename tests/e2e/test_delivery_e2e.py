"""``trace delivery run`` and ``trace alerts ...`` as real processes against a local webhook
receiver (aiohttp on 127.0.0.1, allow-listed with ``--allow``): a Delivery Service SIGKILLed
right after a send (before it recorded the answer), then two services running together through
receiver failures (5xx, a timeout, 429 + Retry-After, a connection reset): every delivery
accepted exactly once with a valid signature, every retry of a delivery carried its one
``webhook-id``, no delivery ever sent by two senders at once; a Delivery Service SIGKILLed
*mid-send* (its request held by the receiver): after the lease lapsed the delivery is sent again
under the same id and accepted once, both attempts recorded; ``/metrics`` (every state, the
oldest due delivery); the operator commands; SSRF refused at creation by the CLI."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Coroutine
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import pytest
from e2e_harness import TraceProcs, free_port

from trace_core.delivery import delivery_key, webhook_id
from trace_lite.delivery import DeliveryStore
from trace_lite.dispatcher import open_pool
from trace_lite.secrets import FileSecretStore
from webhook_receiver import WebhookReceiver

ORG = "acme"
N = 6
T = TypeVar("T")
FAST = "0,0.1,0.1,0.1,0.1,0.1,0.1,0.1,0.1,0.1"


class ThreadedReceiver:
    """The receiver on its own event loop in a thread (the test itself is synchronous)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.receiver: WebhookReceiver | None = None

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def start(self, secret: str) -> WebhookReceiver:
        async def make() -> WebhookReceiver:
            return await WebhookReceiver(secret, hang_s=3.0).start()

        self.receiver = self.call(make())
        return self.receiver

    def close(self) -> None:
        if self.receiver is not None:
            self.call(self.receiver.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def cli(procs: TraceProcs, *argv: str) -> tuple[int, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "trace_servers.cli", *argv],
        env=procs.env(),
        cwd=procs.home,
        capture_output=True,
        timeout=60,
    )
    out = done.stdout.decode()
    try:
        return done.returncode, json.loads(out)
    except json.JSONDecodeError:
        return done.returncode, out + done.stderr.decode()


def db(procs: TraceProcs, fn: Any) -> Any:
    async def go() -> Any:
        pool = await open_pool(procs.db_url, min_size=1, max_size=2)
        try:
            return await fn(pool)
        finally:
            await pool.close()

    return asyncio.run(go())


async def _ensure_org(pool: Any) -> None:
    async with pool.connection() as conn:
        await conn.execute(
            "INSERT INTO orgs (org_id, name) VALUES (gen_random_uuid(), %s) "
            "ON CONFLICT (name) DO NOTHING",
            (ORG,),
        )


@pytest.fixture
def receiver_thread() -> Any:
    t = ThreadedReceiver()
    yield t
    t.close()


def setup_destination(procs: TraceProcs, receiver_thread: ThreadedReceiver) -> tuple[Any, Any]:
    db(procs, _ensure_org)
    # the receiver needs the secret the CLI creates, and the CLI needs the receiver's URL:
    # start it with a placeholder, then hand it the real secret
    receiver = receiver_thread.start("whsec_" + "A" * 44)
    code, refused = cli(
        procs, "alerts", "destination-add", "--org", ORG, "--name", "ops", "--url", receiver.url
    )
    assert code == 1 and refused["error"] == "validation_failed" and refused["field"] == "url"
    assert "loopback" in refused["message"]
    code, dest = cli(
        procs, "alerts", "destination-add", "--org", ORG, "--name", "ops",
        "--url", receiver.url, "--allow", "127.0.0.1/32",
    )  # fmt: skip
    assert code == 0, dest
    stored = asyncio.run(
        FileSecretStore(procs.trace_dir / "secrets" / "store").get(dest["secret_name"])
    )
    assert stored.decode() == dest["signing_secret"]
    receiver.secret = dest["signing_secret"]
    return receiver, dest


def enqueue(procs: TraceProcs, dest: Any, keys: list[str]) -> list[tuple[str, str]]:
    async def go(pool: Any) -> list[tuple[str, str]]:
        store = DeliveryStore(pool)
        out = []
        for key in keys:
            delivery_id, _ = await store.enqueue(
                org_id=dest["org_id"],
                destination_id=dest["destination_id"],
                alert_key=key,
                route="large-transfers",
                event_time=datetime.now(UTC),
                payload={"summary": f"transfer {key}"},
            )
            out.append((delivery_id, key))
        return out

    result: list[tuple[str, str]] = db(procs, go)
    return result


def states(procs: TraceProcs) -> dict[str, str]:
    code, rows = cli(procs, "alerts", "deliveries", "--org", ORG)
    assert code == 0, rows
    return {r["delivery_id"]: r["state"] for r in rows}


def run_args(*extra: str) -> list[str]:
    return [
        "delivery", "run", "--retry-schedule", FAST, "--lease-s", "2", "--timeout-s", "1",
        "--allow", "127.0.0.1/32", "--poll-s", "0.1", "--batch", "3", *extra,
    ]  # fmt: skip


def test_effectively_once_across_kill_9_and_receiver_failures(
    trace_procs: TraceProcs, receiver_thread: ThreadedReceiver
) -> None:
    procs = trace_procs
    receiver, dest = setup_destination(procs, receiver_thread)
    deliveries = enqueue(procs, dest, [f"evt-{i}" for i in range(N)])
    # 1. the first sender is killed right after a receiver accepted a webhook, before recording
    receiver.script = [200]
    killed = procs._spawn("delivery", *run_args("--kill-at", "after_send", "--id", "killed"))
    procs.wait_until(lambda: not killed.alive(), 60, "the sender killed after a send")
    assert len(receiver.accepted) >= 1
    # 2. two senders run through receiver failures until every delivery is sent
    receiver.retry_after = "1"
    receiver.script = [500, "timeout", 429, "reset", 503, 502]
    port = free_port()
    procs._spawn("delivery", *run_args("--id", "p1", "--metrics-port", str(port)))
    procs._spawn("delivery", *run_args("--id", "p2"))
    procs.wait_until(
        lambda: all(s == "sent" for s in states(procs).values()), 120, "every delivery sent"
    )
    expected = {webhook_id(_key(dest, key)) for _, key in deliveries}
    # exactly one accepted webhook per delivery, every request signed and carrying its id
    assert sorted(receiver.accepted) == sorted(expected)
    assert {r.webhook_id for r in receiver.requests} == expected
    assert all(r.valid for r in receiver.requests)
    assert len(receiver.requests) > N  # the crash and the failures caused retries
    # no delivery was ever in flight at the receiver twice at once
    assert max(receiver.max_in_progress.values()) == 1
    # the killed attempt is recorded as expired, then a later attempt succeeded
    outcomes = {}
    for delivery_id, _ in deliveries:
        code, attempts = cli(procs, "alerts", "show", delivery_id)
        assert code == 0
        outcomes[delivery_id] = [(a["sender"], a["outcome"]) for a in attempts]
        assert attempts[-1]["outcome"] == "succeed"
        assert all(a["outcome"] != "in_flight" for a in attempts)
    assert any(("killed", "expire") in o for o in outcomes.values())
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    assert f'trace_delivery_deliveries{{state="sent"}} {float(N)}' in text
    assert 'trace_delivery_deliveries{state="due"} 0.0' in text
    assert "trace_delivery_oldest_due_seconds 0.0" in text


def metrics(port: int) -> dict[str, float]:
    """The Delivery Service's ``/metrics``: each sample's value by its name and labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    samples = (line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    return {name: float(value) for name, value in samples}


def test_a_sender_killed_mid_send_sends_again_under_the_same_id(
    trace_procs: TraceProcs, receiver_thread: ThreadedReceiver
) -> None:
    procs = trace_procs
    receiver, dest = setup_destination(procs, receiver_thread)

    async def hold() -> None:  # the receiver holds every request until the gate opens
        receiver.gate = asyncio.Event()

    async def release() -> None:
        assert receiver.gate is not None
        receiver.gate.set()

    receiver_thread.call(hold())
    ((delivery_id, key),) = enqueue(procs, dest, ["evt-held"])
    # 1. the sender's request is in flight at the receiver (a long timeout: it never gives up
    # by itself) when it is SIGKILLed
    port = free_port()
    args = run_args("--id", "killed", "--timeout-s", "60", "--metrics-port", str(port))
    killed = procs._spawn("delivery", *args)
    procs.wait_until(lambda: len(receiver.requests) == 1, 60, "the request held at the receiver")
    held = metrics(port)
    assert held['trace_delivery_deliveries{state="in_flight"}'] == 1.0
    assert held['trace_delivery_deliveries{state="due"}'] == 0.0
    assert held['trace_delivery_deliveries{state="sent"}'] == 0.0
    assert held["trace_delivery_oldest_due_seconds"] == 0.0
    # a delivery routed meanwhile waits: the sender is inside its pass (due, aging)
    ((waiting, waiting_key),) = enqueue(procs, dest, ["evt-waiting"])
    procs.wait_until(
        lambda: metrics(port)["trace_delivery_oldest_due_seconds"] > 0, 30, "an aging due row"
    )
    assert metrics(port)['trace_delivery_deliveries{state="due"}'] == 1.0
    procs.kill9(killed)
    assert states(procs)[delivery_id] == "in_flight"  # nothing recorded the outcome
    receiver_thread.call(release())
    # 2. a new sender: the lapsed lease makes the delivery due again, and it is sent again
    # under the same webhook-id; the receiver accepts that id once
    port = free_port()
    procs._spawn("delivery", *run_args("--id", "again", "--metrics-port", str(port)))
    procs.wait_until(
        lambda: states(procs)[delivery_id] == states(procs)[waiting] == "sent", 60, "both sent"
    )
    expected = webhook_id(_key(dest, key))
    assert sorted(receiver.accepted) == sorted([expected, webhook_id(_key(dest, waiting_key))])
    assert [r.webhook_id for r in receiver.requests].count(expected) == 2
    assert len(receiver.requests) == 3 and all(r.valid for r in receiver.requests)
    code, attempts = cli(procs, "alerts", "show", delivery_id)
    assert code == 0
    assert [(a["attempt"], a["sender"], a["outcome"]) for a in attempts] == [
        (1, "killed", "expire"),
        (2, "again", "succeed"),
    ]
    assert attempts[1]["status_code"] == 200
    # 3. the other states on /metrics: a stale event is suppressed, a receiver that always
    # fails makes the delivery failed after the last attempt
    db(procs, _enqueue_stale(dest))
    receiver.script = [500] * 10
    ((doomed, _),) = enqueue(procs, dest, ["evt-doomed"])
    procs.wait_until(lambda: states(procs)[doomed] == "failed", 60, "failed after 10 attempts")
    after = metrics(port)
    assert {
        state: after[f'trace_delivery_deliveries{{state="{state}"}}']
        for state in ("due", "in_flight", "sent", "failed", "suppressed", "disabled")
    } == {"due": 0.0, "in_flight": 0.0, "sent": 2.0, "failed": 1.0, "suppressed": 1.0,
          "disabled": 0.0}  # fmt: skip
    assert after["trace_delivery_oldest_due_seconds"] == 0.0


def _enqueue_stale(dest: Any) -> Any:
    async def go(pool: Any) -> None:
        _, state = await DeliveryStore(pool).enqueue(
            org_id=dest["org_id"],
            destination_id=dest["destination_id"],
            alert_key="evt-old",
            route="large-transfers",
            event_time=datetime.now(UTC) - timedelta(days=2),
            payload={"summary": "old"},
            max_delivery_age=timedelta(hours=1),
        )
        assert state.value == "suppressed"

    return go


def _key(dest: Any, alert_key: str) -> str:
    return delivery_key(alert_key, "large-transfers", dest["destination_id"])


def test_operator_commands_disable_retry_and_410(
    trace_procs: TraceProcs, receiver_thread: ThreadedReceiver
) -> None:
    procs = trace_procs
    receiver, dest = setup_destination(procs, receiver_thread)
    # a second destination of the same name is refused and leaves the first one's secret alone
    code, out = cli(
        procs, "alerts", "destination-add", "--org", ORG, "--name", "ops",
        "--url", receiver.url, "--allow", "127.0.0.1/32",
    )  # fmt: skip
    assert code == 1 and out["error"] == "conflict"
    assert asyncio.run(FileSecretStore(procs.trace_dir / "secrets" / "store").list(
        f"trace/org/{dest['org_id']}/"
    )) == [dest["secret_name"]]  # fmt: skip
    code, out = cli(procs, "alerts", "disable", "--org", ORG, "--destination", "ops")
    assert code == 0 and out["enabled"] is False
    ((first, _),) = enqueue(procs, dest, ["evt-a"])
    sender = procs._spawn("delivery", *run_args("--id", "p1"))
    procs.wait_until(lambda: states(procs)[first] == "disabled", 60, "disabled, not sent")
    assert receiver.requests == []
    code, out = cli(procs, "alerts", "enable", "--org", ORG, "--destination", "ops")
    assert code == 0 and out["enabled"] is True
    code, out = cli(procs, "alerts", "retry", first)
    assert code == 0 and out["state"] == "due"
    procs.wait_until(lambda: states(procs)[first] == "sent", 60, "sent after the retry")
    assert len(receiver.accepted) == 1
    # the receiver answers 410 Gone: the destination is disabled and says why
    receiver.script = [410]
    ((second, _),) = enqueue(procs, dest, ["evt-b"])
    procs.wait_until(lambda: states(procs)[second] == "disabled", 60, "410 disables")
    code, rows = cli(procs, "alerts", "deliveries", "--org", ORG, "--state", "disabled")
    assert code == 0 and [r["last_status"] for r in rows] == [410]
    code, out = cli(procs, "alerts", "retry", "no-such-id")
    assert code == 1
    code, out = cli(procs, "alerts", "retry", first)  # a sent delivery is never sent again
    assert code == 1 and out["error"] == "conflict"
    sender.popen.terminate()
    assert sender.popen.wait(30) == 0
