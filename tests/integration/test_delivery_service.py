"""The Delivery Service on real Postgres with a local webhook receiver (aiohttp on loopback,
allow-listed): signed webhooks, retries on a compressed schedule, 429/410, lapsed leases,
SKIP LOCKED leasing, SSRF at creation and at send time."""

from __future__ import annotations

import asyncio
import ipaddress
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import attrs
import pytest

from trace_core import errors
from trace_core.delivery import DeliveryEvent as E
from trace_core.delivery import DeliveryState, LeasePolicy, RetrySchedule, SendResult, webhook_id
from trace_core.secret_names import org_secret
from trace_core.ssrf import Address, AllowList
from trace_core.testing.memory_secrets import MemorySecretStore
from trace_lite.delivery import DeliveryStore, Outcome
from trace_lite.delivery_service import DeliveryService
from trace_lite.delivery_wakeups import CHANNEL, DeliveryWakeups
from trace_lite.dispatcher import open_pool
from trace_lite.webhook_sender import WebhookSender, check_url, new_signing_secret
from waiting import wait_until
from webhook_receiver import WebhookReceiver

LOOPBACK = AllowList.of(["127.0.0.1/32"])
FAST = RetrySchedule((0.0, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01))


@attrs.define
class Env:
    store: DeliveryStore
    secrets: MemorySecretStore
    receiver: WebhookReceiver
    org_id: str
    destination_id: str
    secret_name: str
    pool: Any

    def service(self, sender: WebhookSender | None = None, name: str = "s1") -> DeliveryService:
        sender = sender or WebhookSender(self.secrets, allow=LOOPBACK, timeout_s=0.5)
        return DeliveryService(self.store, sender, sender_id=name, batch=10)

    async def enqueue(self, alert_key: str = "evt-1", **kw: Any) -> str:
        delivery_id, _ = await self.store.enqueue(
            org_id=self.org_id,
            destination_id=kw.pop("destination_id", self.destination_id),
            alert_key=alert_key,
            route="large-transfers",
            event_time=kw.pop("event_time", datetime.now(UTC)),
            payload={"summary": f"transfer {alert_key}", "amount": "1000"},
            **kw,
        )
        return delivery_id

    async def state(self, delivery_id: str) -> DeliveryState:
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT state FROM alert_deliveries WHERE delivery_id = %s", (delivery_id,)
            )
            row = await cur.fetchone()
        return DeliveryState(row[0])


@pytest.fixture
async def env(db_url: str) -> AsyncIterator[Env]:
    pool = await open_pool(db_url, min_size=1, max_size=6)
    secrets = MemorySecretStore()
    secret = new_signing_secret()
    receiver = await WebhookReceiver(secret, hang_s=3.0).start()
    async with pool.connection() as conn:
        cur = await conn.execute(
            "INSERT INTO orgs (org_id, name) VALUES (gen_random_uuid(), 'acme') "
            "RETURNING org_id::text"
        )
        row = await cur.fetchone()
    assert row is not None
    org_id = row[0]
    secret_name = org_secret(org_id, "webhooks.ops")
    await secrets.put(secret_name, secret.encode())
    store = DeliveryStore(pool, schedule=FAST, lease=LeasePolicy(lease_s=30))
    dest = await store.add_destination(
        org_id=org_id, name="ops", kind="webhook", url=receiver.url, secret_name=secret_name
    )
    yield Env(store, secrets, receiver, org_id, dest.destination_id, secret_name, pool)
    await receiver.stop()
    await pool.close()


async def drive(service: DeliveryService, done: Any, *, passes: int = 200) -> None:
    """Run passes until ``done()`` (bounded; the compressed schedule makes retries due at
    once, so this polls the outcome, it does not time it)."""
    for _ in range(passes):
        if await done():
            return
        await service.run_once()
        await asyncio.sleep(0.02)
    raise AssertionError("the deliveries did not settle")


async def test_one_delivery_one_accepted_signed_webhook(env: Env) -> None:
    delivery_id = await env.enqueue()
    assert await env.enqueue() == delivery_id  # routing the same event again: same delivery
    service = env.service()
    await drive(service, lambda: _is(env, delivery_id, DeliveryState.SENT))
    assert len(env.receiver.accepted) == 1 and len(env.receiver.requests) == 1
    request = env.receiver.requests[0]
    assert request.valid
    body = json.loads(request.body)
    assert body["alert"]["amount"] == "1000" and body["route"] == "large-transfers"
    assert request.webhook_id == webhook_id(body["delivery_key"])
    attempts = await env.store.attempts(delivery_id)
    assert [(a.attempt, a.outcome, a.status_code, a.sender) for a in attempts] == [
        (1, "succeed", 200, "s1")
    ]
    assert attempts[0].latency_ms is not None and attempts[0].finished_at is not None
    counts = await env.store.counts()
    assert counts.by_state["sent"] == 1 and counts.by_state["due"] == 0


async def _is(env: Env, delivery_id: str, state: DeliveryState) -> bool:
    return await env.state(delivery_id) is state


async def test_receiver_failures_retry_with_the_same_id_until_accepted_once(env: Env) -> None:
    env.receiver.script = [500, "timeout", 429, "reset", 503, 200, 200]
    delivery_id = await env.enqueue()
    await drive(env.service(), lambda: _is(env, delivery_id, DeliveryState.SENT))
    ids = {r.webhook_id for r in env.receiver.requests}
    assert len(env.receiver.requests) == 6 and len(ids) == 1
    assert all(r.valid for r in env.receiver.requests)
    assert env.receiver.accepted == list(ids)
    # the same body on every attempt
    assert len({r.body for r in env.receiver.requests}) == 1
    attempts = await env.store.attempts(delivery_id)
    assert [a.outcome for a in attempts] == [
        "fail", "fail", "rate_limited", "fail", "fail", "succeed"
    ]  # fmt: skip
    assert [a.status_code for a in attempts] == [500, None, 429, None, 503, 200]
    assert "timed out" in (attempts[1].error or "")
    assert "connection failed" in (attempts[3].error or "")


async def test_429_retry_after_is_honoured(env: Env) -> None:
    env.receiver.script = [429]
    env.receiver.retry_after = "3600"
    delivery_id = await env.enqueue()
    stats = await env.service().run_once()
    assert stats.leased == 1
    async with env.pool.connection() as conn:
        cur = await conn.execute(
            "SELECT state, extract(epoch FROM available_at - now()) FROM alert_deliveries "
            "WHERE delivery_id = %s",
            (delivery_id,),
        )
        row = await cur.fetchone()
    assert row is not None and row[0] == "due" and row[1] > 3500
    assert (await env.service().run_once()).leased == 0  # not due before Retry-After


async def test_retries_end_in_failed_after_the_last_attempt(env: Env) -> None:
    env.receiver.script = [500] * 20
    delivery_id = await env.enqueue()
    await drive(env.service(), lambda: _is(env, delivery_id, DeliveryState.FAILED))
    assert len(env.receiver.requests) == FAST.max_attempts
    assert env.receiver.accepted == []
    (row,) = await env.store.deliveries(env.org_id, state="failed")
    assert row.last_status == 500 and row.attempt == FAST.max_attempts


async def test_410_disables_the_destination_and_its_due_deliveries(env: Env) -> None:
    env.receiver.script = [410]
    env.receiver.gate = asyncio.Event()
    first = await env.enqueue("evt-1")
    service = env.service()
    service.batch = 1
    task = asyncio.create_task(service.run_once())
    while not env.receiver.requests:  # noqa: ASYNC110 - the receiver's own record
        await asyncio.sleep(0.01)
    second = await env.enqueue("evt-2")  # due while the first is in flight
    env.receiver.gate.set()
    await task
    assert await env.state(first) is DeliveryState.DISABLED
    assert await env.state(second) is DeliveryState.DISABLED
    dest = await env.store.destination(env.destination_id)
    assert not dest.enabled and "410" in (dest.disabled_reason or "")
    third = await env.enqueue("evt-3")
    await env.service().run_once()  # a new delivery to a disabled destination is not sent
    assert await env.state(third) is DeliveryState.DISABLED
    assert len(env.receiver.requests) == 1
    # an operator re-enables it and retries: sent
    await env.store.set_enabled(env.destination_id, enabled=True, reason=None)
    assert await env.store.retry(third) is DeliveryState.DUE
    await drive(env.service(), lambda: _is(env, third, DeliveryState.SENT))


async def test_a_lapsed_lease_makes_the_delivery_due_again_and_fences_the_late_sender(
    env: Env,
) -> None:
    store = DeliveryStore(env.pool, schedule=FAST, lease=LeasePolicy(lease_s=0.2))
    delivery_id = await env.enqueue()
    (crashed,) = await store.lease(5, sender="crashed")  # never reports
    while await store.reap() == 0:  # noqa: ASYNC110 - polls the database, not a flag
        await asyncio.sleep(0.05)
    assert await env.state(delivery_id) is DeliveryState.DUE
    service = DeliveryService(env.store, WebhookSender(env.secrets, allow=LOOPBACK), sender_id="s2")
    await drive(service, lambda: _is(env, delivery_id, DeliveryState.SENT))
    with pytest.raises(errors.LeaseLost):
        await env.store.record(crashed.fence, SendResult(E.SUCCEED, 200), latency_ms=1)
    attempts = await env.store.attempts(delivery_id)
    assert [(a.attempt, a.outcome, a.sender) for a in attempts] == [
        (1, "expire", "crashed"),
        (2, "succeed", "s2"),
    ]
    assert len(env.receiver.accepted) == 1


async def test_a_pass_records_its_outcomes_together_and_skips_only_a_lost_one(
    env: Env,
) -> None:
    store = DeliveryStore(env.pool, schedule=FAST, lease=LeasePolicy(lease_s=0.2))
    ids = [await env.enqueue(f"evt-{i}") for i in range(3)]
    leased = {x.fence.delivery_id: x for x in await store.lease(5, sender="s1")}
    # the middle one's lease lapses and another sender holds it now
    async with env.pool.connection() as conn:
        await conn.execute(
            "UPDATE alert_deliveries SET lease_expires_at = now() - interval '1 s' "
            "WHERE delivery_id = %s",
            (ids[1],),
        )
    assert await store.reap() == 1
    async with env.pool.connection() as conn:  # due now, not after the schedule's jitter
        await conn.execute(
            "UPDATE alert_deliveries SET available_at = now() WHERE delivery_id = %s", (ids[1],)
        )
    (again,) = await store.lease(5, sender="s2")
    assert again.fence.delivery_id == ids[1]
    ok = SendResult(E.SUCCEED, 200)
    states = await env.store.record_many([Outcome(leased[i].fence, ok, 1) for i in ids])
    assert states == [DeliveryState.SENT, None, DeliveryState.SENT]
    assert await env.state(ids[1]) is DeliveryState.IN_FLIGHT  # s2's attempt untouched
    assert [a.outcome for a in await env.store.attempts(ids[1])] == ["expire", "in_flight"]


async def test_two_senders_never_lease_one_delivery_at_once(env: Env) -> None:
    ids = {await env.enqueue(f"evt-{i}") for i in range(40)}
    a = DeliveryStore(env.pool, schedule=FAST)
    b = DeliveryStore(env.pool, schedule=FAST)
    got_a, got_b = await asyncio.gather(a.lease(25, sender="a"), b.lease(25, sender="b"))
    leased_a = {x.fence.delivery_id for x in got_a}
    leased_b = {x.fence.delivery_id for x in got_b}
    assert not leased_a & leased_b
    assert leased_a | leased_b <= ids and len(leased_a | leased_b) == 40
    counts = await env.store.counts()
    assert counts.by_state["in_flight"] == 40


async def test_two_services_send_each_delivery_once(env: Env) -> None:
    ids = [await env.enqueue(f"evt-{i}") for i in range(30)]
    s1, s2 = env.service(name="s1"), env.service(name="s2")

    async def all_sent() -> bool:
        return all([await _is(env, d, DeliveryState.SENT) for d in ids])

    for _ in range(100):
        if await all_sent():
            break
        await asyncio.gather(s1.run_once(), s2.run_once())
    assert await all_sent()
    assert len(env.receiver.requests) == 30 and len(set(env.receiver.accepted)) == 30
    assert max(env.receiver.max_in_progress.values()) == 1


async def test_staleness_suppresses_with_the_reason(env: Env) -> None:
    delivery_id = await env.enqueue(
        event_time=datetime.now(UTC) - timedelta(hours=3), max_delivery_age=timedelta(hours=1)
    )
    assert await env.state(delivery_id) is DeliveryState.SUPPRESSED
    assert (await env.service().run_once()).leased == 0
    (row,) = await env.store.deliveries(env.org_id, state="suppressed")
    assert "max_delivery_age is 3600 s" in (row.suppressed_reason or "")
    assert env.receiver.requests == []


async def test_redirects_are_not_followed(env: Env) -> None:
    dest = await env.store.add_destination(
        org_id=env.org_id,
        name="redir",
        kind="webhook",
        url=env.receiver.url.replace("/hook", "/redirect"),
        secret_name=env.secret_name,
    )
    delivery_id = await env.enqueue(destination_id=dest.destination_id)
    await env.service().run_once()
    attempts = await env.store.attempts(delivery_id)
    assert [(a.outcome, a.status_code) for a in attempts] == [("fail", 302)]
    assert [r.webhook_id for r in env.receiver.requests] == [""]  # only /redirect was hit
    assert env.receiver.accepted == []


class FlippingResolver:
    """DNS that answers a public address first and loopback afterwards (a rebinding attack)."""

    def __init__(self, *answers: str) -> None:
        self.answers = [ipaddress.ip_address(a) for a in answers]
        self.calls = 0

    async def __call__(self, host: str, port: int) -> list[Address]:
        answer = self.answers[min(self.calls, len(self.answers) - 1)]
        self.calls += 1
        return [answer]


async def test_ssrf_refused_at_creation_and_at_send_time(env: Env) -> None:
    flipping = FlippingResolver("93.184.216.34", "127.0.0.1")
    url = f"http://hooks.example.test:{env.receiver.port}/hook"
    target = await check_url(url, resolve=flipping)  # creation: public, accepted
    assert target.addresses == (ipaddress.ip_address("93.184.216.34"),)
    for bad in (
        "http://127.0.0.1/hook",
        "http://2130706433/hook",
        "http://0x7f.1/hook",
        "http://[::ffff:127.0.0.1]/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://[fd00:ec2::254]/",
        "http://10.1/hook",
        "ftp://example.com/",
        "http://user:pw@example.com/",
    ):
        with pytest.raises(errors.ValidationFailed) as exc:
            await check_url(bad, resolve=flipping)
        assert exc.value.field == "url"
    with pytest.raises(errors.ValidationFailed, match="refused"):
        await check_url(url, resolve=FlippingResolver("10.0.0.7"))
    dest = await env.store.add_destination(
        org_id=env.org_id, name="rebind", kind="webhook", url=url, secret_name=env.secret_name
    )
    delivery_id = await env.enqueue(destination_id=dest.destination_id)
    # at send time the name resolves to loopback (not allow-listed here): refused, never sent
    sender = WebhookSender(env.secrets, resolve=flipping)
    await env.service(sender).run_once()
    assert await env.state(delivery_id) is DeliveryState.FAILED
    attempts = await env.store.attempts(delivery_id)
    assert attempts[0].outcome == "refuse" and "loopback" in (attempts[0].error or "")
    assert env.receiver.requests == []


async def test_the_connection_goes_to_the_checked_address_only(env: Env) -> None:
    # The name resolves (once) to the allow-listed receiver; the Host header keeps the name.
    resolver = FlippingResolver("127.0.0.1", "10.9.9.9")
    dest = await env.store.add_destination(
        org_id=env.org_id,
        name="named",
        kind="webhook",
        url=f"http://hooks.example.test:{env.receiver.port}/hook",
        secret_name=env.secret_name,
    )
    delivery_id = await env.enqueue(destination_id=dest.destination_id)
    sender = WebhookSender(env.secrets, resolve=resolver, allow=LOOPBACK)
    await drive(env.service(sender), lambda: _is(env, delivery_id, DeliveryState.SENT))
    assert resolver.calls == 1
    assert env.receiver.requests[0].headers["host"] == f"hooks.example.test:{env.receiver.port}"


async def test_slack_and_pagerduty_shapes(env: Env) -> None:
    await env.secrets.put(env.secret_name + "-routing-key", b"R0UT1NG")
    kinds = {}
    for kind in ("slack", "pagerduty"):
        dest = await env.store.add_destination(
            org_id=env.org_id,
            name=kind,
            kind=kind,
            url=env.receiver.url,
            secret_name=env.secret_name,
        )
        kinds[kind] = await env.enqueue(destination_id=dest.destination_id)
    await drive(
        env.service(),
        lambda: _all(env, list(kinds.values()), DeliveryState.SENT),
    )
    bodies = [json.loads(r.body) for r in env.receiver.requests]
    slack = next(b for b in bodies if "blocks" in b)
    assert slack["text"] == "transfer evt-1"
    pd = next(b for b in bodies if "routing_key" in b)
    assert pd["routing_key"] == "R0UT1NG" and pd["event_action"] == "trigger"
    assert len(pd["dedup_key"]) == 64 and pd["payload"]["summary"] == "transfer evt-1"
    assert all(r.valid for r in env.receiver.requests)


async def _all(env: Env, ids: list[str], state: DeliveryState) -> bool:
    return all([await _is(env, d, state) for d in ids])


async def test_a_missing_secret_is_a_retryable_failure(env: Env) -> None:
    await env.secrets.delete(env.secret_name)
    delivery_id = await env.enqueue()
    await env.service().run_once()
    attempts = await env.store.attempts(delivery_id)
    assert attempts[0].outcome == "fail" and "secret" in (attempts[0].error or "")
    assert env.receiver.requests == []


class FailingResolver:
    async def __call__(self, host: str, port: int) -> list[Address]:
        raise OSError("temporary failure in name resolution")


async def test_a_name_that_does_not_resolve_now_is_retried_not_refused(env: Env) -> None:
    with pytest.raises(errors.Unavailable):
        await check_url("http://hooks.example.test/hook", resolve=FailingResolver())
    dest = await env.store.add_destination(
        org_id=env.org_id,
        name="flaky-dns",
        kind="webhook",
        url="http://hooks.example.test/hook",
        secret_name=env.secret_name,
    )
    delivery_id = await env.enqueue(destination_id=dest.destination_id)
    sender = WebhookSender(env.secrets, resolve=FailingResolver())
    await env.service(sender).run_once()
    assert await env.state(delivery_id) is DeliveryState.DUE
    (attempt,) = await env.store.attempts(delivery_id)
    assert attempt.outcome == "fail" and "does not resolve" in (attempt.error or "")


class _Idle:
    """Wraps a service's ``run_once``: ``went_idle`` is set after each pass that leased
    nothing (the service is about to wait)."""

    def __init__(self, service: DeliveryService) -> None:
        self.went_idle = asyncio.Event()
        self._run_once = service.run_once
        service.run_once = self._pass  # type: ignore[method-assign]

    async def _pass(self) -> Any:
        stats = await self._run_once()
        if stats.leased == 0:
            self.went_idle.set()
        return stats


async def _listeners(env: Env) -> list[int]:
    async with env.pool.connection() as conn:
        cur = await conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND query LIKE %s",
            (f'%LISTEN "{CHANNEL}"%',),
        )
        return [r[0] for r in await cur.fetchall()]


async def test_an_idle_service_is_woken_when_a_delivery_becomes_due(env: Env, db_url: str) -> None:
    """The poll is an hour: only the wake-up (migration 0029's NOTIFY at the commit that made
    the delivery due) can make the idle service send a delivery routed after it went idle --
    also after its listening connection was killed and it reconnected."""
    wakeups = await DeliveryWakeups(db_url).start()
    sender = WebhookSender(env.secrets, allow=LOOPBACK, timeout_s=5)
    service = DeliveryService(
        env.store, sender, sender_id="s1", batch=10, poll_s=3600, wakeups=wakeups
    )
    idle = _Idle(service)
    stop = asyncio.Event()
    running = asyncio.create_task(service.run(stop))
    try:
        for i, kill_listener in enumerate((False, True)):
            if kill_listener:
                # the reconnected listener wakes the service: one more pass, then idle again
                idle.went_idle.clear()
                (old,) = await _listeners(env)
                async with env.pool.connection() as conn:
                    await conn.execute("SELECT pg_terminate_backend(%s)", (old,))

                async def listens_again(old: int = old) -> bool:
                    return len(pids := await _listeners(env)) == 1 and pids[0] != old

                await wait_until(listens_again, "the listener reconnected", 30.0)
            async with asyncio.timeout(30):
                await idle.went_idle.wait()
            delivery_id = await env.enqueue(f"evt-{i}")
            await wait_until(lambda d=delivery_id: _is(env, d, DeliveryState.SENT), "sent", 30.0)
        assert len(env.receiver.accepted) == 2
        assert wakeups.notifications >= 2
    finally:
        stop.set()
        await running
        await wakeups.close()
