"""The Dispatcher against real Postgres, driven in-process: lifecycle, fencing, idempotency."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import attrs
import pytest

from pg_sql import sql
from trace_core import errors, wire
from trace_core.lifecycle import RetryPolicy
from trace_core.testing.memory_queue import MemoryQueue
from trace_core.testing.memory_signer import MemorySigner
from trace_core.testing.memory_store import MemoryObjectStore
from trace_core.token import subject_for
from trace_lite.dispatcher import Dispatcher, open_pool


@pytest.fixture
async def dispatcher(db_url: str) -> AsyncIterator[Dispatcher]:
    pool = await open_pool(db_url, min_size=1, max_size=4)
    d = Dispatcher(
        pool,
        signer=MemorySigner(),
        queue=MemoryQueue("tasks"),
        object_store=MemoryObjectStore(),
        retry=RetryPolicy(max_attempts=3, base_s=0.0),
        rand=lambda: 0.5,
    )
    try:
        yield d
    finally:
        await pool.close()


async def _create(d: Dispatcher, **kw: Any) -> str:
    (info,) = await d.create_tasks([wire.CreateTaskRequest(operator="noop", **kw)])
    return info.task_id


def _fence(c: wire.ClaimResponse) -> dict[str, Any]:
    return {"task_id": c.task_id, "attempt": c.attempt, "lease_token": c.lease_token}


def _expire(db_url: str, task_id: str) -> None:
    sql(
        db_url,
        "UPDATE tasks SET lease_expires_at = now() - interval '1 second' WHERE task_id = %s",
        (task_id,),
    )


async def test_happy_path_writes_one_completion_with_events(
    dispatcher: Dispatcher, db_url: str
) -> None:
    task_id = await _create(dispatcher)
    claim = await dispatcher.claim(task_id, "w1")
    assert claim.attempt == 1
    f = _fence(claim)
    await dispatcher.heartbeat(wire.HeartbeatRequest(**f))
    r = await dispatcher.emit_events(
        wire.EventsRequest(
            **f,
            events=[
                wire.EventIn("a", "progress", {"i": 1}),
                wire.EventIn("b", "progress", {"i": 2}),
            ],
        )
    )
    assert (r.accepted, r.duplicates) == (2, 0)
    done = await dispatcher.complete(
        wire.CompleteRequest(
            **f, result={"ok": True}, final_events=[wire.EventIn("done", "done", {})]
        )
    )
    assert done.state == "completed" and not done.replay
    task = await dispatcher.get_task(task_id)
    assert task["state"] == "completed"
    assert [e["event_key"] for e in task["events"]] == ["a", "b", "done"]
    assert [a["outcome"] for a in task["attempts"]] == ["succeeded"]
    # the wake-up went through the outbox
    assert sql(db_url, "SELECT count(*) FROM outbox WHERE topic = 'wake'")[0][0] == 1


async def test_complete_twice_same_body_is_replay_different_body_is_409(
    dispatcher: Dispatcher,
) -> None:
    task_id = await _create(dispatcher)
    f = _fence(await dispatcher.claim(task_id))
    first = await dispatcher.complete(wire.CompleteRequest(**f, result={"n": 1}))
    again = await dispatcher.complete(wire.CompleteRequest(**f, result={"n": 1}))
    assert again.replay and again.state == first.state == "completed"
    with pytest.raises(errors.IdempotencyMismatch):
        await dispatcher.complete(wire.CompleteRequest(**f, result={"n": 2}))


async def test_claim_is_exclusive_and_duplicate_wakes_do_not_double_claim(
    dispatcher: Dispatcher,
) -> None:
    task_id = await _create(dispatcher)
    results = await asyncio.gather(
        *(dispatcher.claim(task_id, f"w{i}") for i in range(8)), return_exceptions=True
    )
    wins = [r for r in results if isinstance(r, wire.ClaimResponse)]
    assert len(wins) == 1
    # losers see it running (not claimable) or locked mid-claim (retry later, keep the wake-up)
    assert all(
        isinstance(r, errors.TaskNotClaimable | errors.Unavailable)
        for r in results
        if r not in wins
    )


async def test_stale_attempt_is_fenced_out_everywhere(dispatcher: Dispatcher, db_url: str) -> None:
    task_id = await _create(dispatcher)
    old = _fence(await dispatcher.claim(task_id))
    _expire(db_url, task_id)
    report = await dispatcher.reap_once()
    assert report.expired == 1 and report.due == 1  # base_s=0: due at once
    new = await dispatcher.claim(task_id)
    assert new.attempt == 2
    batch = wire.BufferBatchIn("b", "rows", "org/x/y", 1, 1, "0" * 64)
    for call in (
        dispatcher.heartbeat(wire.HeartbeatRequest(**old)),
        dispatcher.emit_events(wire.EventsRequest(**old, events=[wire.EventIn("k", "t")])),
        dispatcher.publish_buffer(wire.BufferPublishRequest(**old, batch=batch)),
        dispatcher.complete(wire.CompleteRequest(**old)),
    ):
        with pytest.raises(errors.LeaseLost):
            await call
    assert sql(db_url, "SELECT count(*) FROM task_events")[0][0] == 0
    assert sql(db_url, "SELECT count(*) FROM buffer_batches")[0][0] == 0
    task = await dispatcher.get_task(task_id)
    assert task["state"] == "running" and task["attempt"] == 2
    assert [a["outcome"] for a in task["attempts"]] == ["timed_out", "running"]


async def test_wrong_lease_token_is_409(dispatcher: Dispatcher) -> None:
    task_id = await _create(dispatcher)
    f = _fence(await dispatcher.claim(task_id))
    f["lease_token"] = "00000000-0000-4000-8000-000000000000"
    with pytest.raises(errors.LeaseLost):
        await dispatcher.complete(wire.CompleteRequest(**f))


async def test_late_completion_accepted_when_no_newer_attempt(
    dispatcher: Dispatcher, db_url: str
) -> None:
    task_id = await _create(dispatcher)
    f = _fence(await dispatcher.claim(task_id))
    _expire(db_url, task_id)
    await dispatcher.reap_once()  # → queued again, attempt 1 still current
    done = await dispatcher.complete(wire.CompleteRequest(**f))
    assert done.state == "completed"
    with pytest.raises(errors.TaskNotClaimable):
        await dispatcher.claim(task_id)


async def test_retry_until_max_attempts_then_failed(dispatcher: Dispatcher) -> None:
    task_id = await _create(dispatcher, max_attempts=2)
    f = _fence(await dispatcher.claim(task_id))
    r = await dispatcher.complete(wire.CompleteRequest(**f, outcome="failed", error={"m": "x"}))
    assert r.state == "pending"
    await dispatcher.reap_once()
    f2 = _fence(await dispatcher.claim(task_id))
    assert f2["attempt"] == 2
    r2 = await dispatcher.complete(wire.CompleteRequest(**f2, outcome="failed"))
    assert r2.state == "failed"


async def test_non_retryable_failure_fails_at_once(dispatcher: Dispatcher) -> None:
    task_id = await _create(dispatcher)
    f = _fence(await dispatcher.claim(task_id))
    r = await dispatcher.complete(wire.CompleteRequest(**f, outcome="failed", retryable=False))
    assert r.state == "failed"


async def test_cancel_queued_and_running(dispatcher: Dispatcher) -> None:
    queued = await _create(dispatcher)
    info = await dispatcher.cancel(queued)
    assert info.state == "canceled"
    assert (await dispatcher.cancel(queued)).state == "canceled"  # idempotent
    with pytest.raises(errors.TaskCanceled):
        await dispatcher.claim(queued)
    running = await _create(dispatcher)
    f = _fence(await dispatcher.claim(running))
    await dispatcher.cancel(running)
    with pytest.raises(errors.TaskCanceled):
        await dispatcher.heartbeat(wire.HeartbeatRequest(**f))
    with pytest.raises(errors.TaskCanceled):
        await dispatcher.complete(wire.CompleteRequest(**f))
    ack = await dispatcher.complete(wire.CompleteRequest(**f, outcome="canceled"))
    assert ack.state == "canceled"
    task = await dispatcher.get_task(running)
    assert task["attempts"][0]["outcome"] == "canceled"
    done = await _create(dispatcher)
    await dispatcher.complete(wire.CompleteRequest(**_fence(await dispatcher.claim(done))))
    with pytest.raises(errors.Conflict):
        await dispatcher.cancel(done)


async def test_events_are_deduplicated_by_key_across_attempts(
    dispatcher: Dispatcher, db_url: str
) -> None:
    task_id = await _create(dispatcher)
    f1 = _fence(await dispatcher.claim(task_id))
    await dispatcher.emit_events(wire.EventsRequest(**f1, events=[wire.EventIn("k1", "t")]))
    await dispatcher.complete(wire.CompleteRequest(**f1, outcome="failed"))
    await dispatcher.reap_once()
    f2 = _fence(await dispatcher.claim(task_id))
    r = await dispatcher.emit_events(
        wire.EventsRequest(**f2, events=[wire.EventIn("k1", "t"), wire.EventIn("k2", "t")])
    )
    assert (r.accepted, r.duplicates) == (1, 1)
    assert sql(db_url, "SELECT count(*) FROM task_events")[0][0] == 2


async def test_buffer_publish_checks_prefix_and_object(dispatcher: Dispatcher) -> None:
    task_id = await _create(dispatcher)
    claim = await dispatcher.claim(task_id)
    f = _fence(claim)
    payload = await dispatcher.fetch(task_id)
    store = dispatcher.object_store
    assert store is not None
    key = f"{payload.staging_prefix}buffer/rows/b1.jsonl"
    info = await store.put(key, b'{"a":1}\n')
    good = wire.BufferBatchIn("b1", "rows", key, 1, info.size, info.sha256)
    r = await dispatcher.publish_buffer(wire.BufferPublishRequest(**f, batch=good))
    assert r.accepted and not r.duplicate
    again = await dispatcher.publish_buffer(wire.BufferPublishRequest(**f, batch=good))
    assert again.duplicate
    other = wire.BufferBatchIn("b1", "rows", key, 2, info.size, info.sha256)
    with pytest.raises(errors.IdempotencyMismatch):
        await dispatcher.publish_buffer(wire.BufferPublishRequest(**f, batch=other))
    outside = f"org/{payload.org_id}/staging/task/{task_id}/attempt/2/x.jsonl"
    for bad_key in (outside, "../etc/passwd", "/abs/key", f"{payload.staging_prefix}../../x"):
        bad = wire.BufferBatchIn("b2", "rows", bad_key, 1, 1, info.sha256)
        with pytest.raises(errors.UnsafeKey):
            await dispatcher.publish_buffer(wire.BufferPublishRequest(**f, batch=bad))
    wrong_sum = wire.BufferBatchIn("b3", "rows", key, 1, info.size, "0" * 64)
    with pytest.raises(errors.ValidationFailed):
        await dispatcher.publish_buffer(wire.BufferPublishRequest(**f, batch=wrong_sum))


async def test_outbox_publishes_wakes_to_the_queue(dispatcher: Dispatcher, db_url: str) -> None:
    ids = [
        i.task_id
        for i in await dispatcher.create_tasks(
            [wire.CreateTaskRequest(operator="noop") for _ in range(150)]
        )
    ]
    sent = 0
    while n := await dispatcher.publish_outbox_once():
        sent += n
    assert sent == 150
    assert dispatcher.queue is not None
    got: list[str] = []
    while msgs := await dispatcher.queue.receive(max_messages=10):
        got += [json.loads(m.body)["task_id"] for m in msgs]
    assert sorted(got) == sorted(ids)
    assert sql(db_url, "SELECT count(*) FROM outbox WHERE state = 'pending'")[0][0] == 0


async def test_outbox_send_failure_backs_off(dispatcher: Dispatcher, db_url: str) -> None:
    await _create(dispatcher)
    queue = dispatcher.queue
    assert isinstance(queue, MemoryQueue)
    queue.fail_next("send", errors.Unavailable("queue down"))
    assert await dispatcher.publish_outbox_once() == 0
    ((state, tries, later),) = sql(db_url, "SELECT state, tries, available_at > now() FROM outbox")
    assert (state, tries) == ("pending", 1) and later


async def test_outbox_marks_published_only_what_a_consumer_took(
    dispatcher: Dispatcher, db_url: str
) -> None:
    """Rows of topics nothing consumes yet (``buffer:*``, ``dataset.invalidate``, ``invoke``
    without a Lambda launcher) stay pending, however often the publisher runs (#7 item 5)."""
    task_id = await _create(dispatcher)
    f = _fence(await dispatcher.claim(task_id))
    store = dispatcher.object_store
    assert store is not None
    key = f"{(await dispatcher.fetch(task_id)).staging_prefix}b1.jsonl"
    info = await store.put(key, b"{}\n")
    batch = wire.BufferBatchIn("b1", "rows", key, 1, info.size, info.sha256)
    await dispatcher.publish_buffer(wire.BufferPublishRequest(**f, batch=batch))
    sql(
        db_url,
        "INSERT INTO outbox (topic, payload) VALUES ('dataset.invalidate', '{}'), ('invoke', %s)",
        (json.dumps({"task_id": task_id}),),
    )
    assert dispatcher.consumed_topics() == ["wake"]
    assert await dispatcher.publish_outbox_once() == 1  # the wake-up only
    assert await dispatcher.publish_outbox_once() == 0
    rows = sql(db_url, "SELECT topic, state, tries FROM outbox ORDER BY id")
    assert rows == [
        ("wake", "published", 1),
        ("buffer:rows", "pending", 0),
        ("dataset.invalidate", "pending", 0),
        ("invoke", "pending", 0),
    ]


async def test_idempotency_key_returns_existing_task(dispatcher: Dispatcher) -> None:
    a = await dispatcher.create_tasks(
        [wire.CreateTaskRequest(operator="noop", idempotency_key="run-1")]
    )
    b = await dispatcher.create_tasks(
        [
            wire.CreateTaskRequest(operator="noop", idempotency_key="run-1"),
            wire.CreateTaskRequest(operator="noop"),
        ]
    )
    assert b[0].task_id == a[0].task_id and not b[0].created
    assert b[1].created


async def test_delayed_task_is_pending_until_due(dispatcher: Dispatcher, db_url: str) -> None:
    task_id = await _create(dispatcher, delay_s=30)
    with pytest.raises(errors.TaskNotClaimable):
        await dispatcher.claim(task_id)
    sql(db_url, "UPDATE tasks SET available_at = now() WHERE task_id = %s", (task_id,))
    assert (await dispatcher.reap_once()).due == 1
    assert (await dispatcher.claim(task_id)).attempt == 1


async def test_capability_token_binds_task_and_attempt(dispatcher: Dispatcher) -> None:
    a = await dispatcher.claim(await _create(dispatcher))
    b = await dispatcher.claim(await _create(dispatcher))
    claims = await dispatcher.authorize(a.capability_token, a.task_id, a.attempt)
    assert claims.task_id == a.task_id and claims.attempt == 1
    with pytest.raises(errors.Forbidden):
        await dispatcher.authorize(a.capability_token, b.task_id, 1)
    with pytest.raises(errors.Forbidden):
        await dispatcher.authorize(a.capability_token, a.task_id, 2)
    with pytest.raises(errors.Unauthenticated):
        await dispatcher.authorize(None, a.task_id, 1)
    with pytest.raises(errors.Unauthenticated):
        await dispatcher.authorize(a.capability_token[:-4] + "AAAA", a.task_id, 1)


async def test_a_validly_signed_token_with_a_wrong_sub_or_org_is_refused(
    dispatcher: Dispatcher,
) -> None:
    """Every claim is checked against the task row, not only task_id and attempt (#8 item 10)."""
    a = await dispatcher.claim(await _create(dispatcher, org="org-a"))
    b = await dispatcher.claim(await _create(dispatcher, org="org-b"))
    good = await dispatcher.authorize(a.capability_token, a.task_id, a.attempt)
    other_org = (await dispatcher.authorize(b.capability_token, b.task_id, 1)).org_id
    forged = {
        "sub of another task": attrs.evolve(good, sub=subject_for(b.task_id, 1)),
        "sub of another attempt": attrs.evolve(good, sub=subject_for(a.task_id, 2)),
        "sub not a subject": attrs.evolve(good, sub=a.task_id),
        "another org": attrs.evolve(good, org_id=other_org),
        "org not a UUID": attrs.evolve(good, org_id="org-a"),
        "org in upper case": attrs.evolve(good, org_id=good.org_id.upper()),
    }
    for name, claims in forged.items():
        token = await dispatcher.issuer.encode(claims)  # signed with the Dispatcher's own key
        with pytest.raises(errors.Unauthenticated):
            await dispatcher.authorize(token, a.task_id, a.attempt)
            pytest.fail(f"accepted a token with {name}")
    # the same checks through a fresh Dispatcher, whose task->org cache starts empty
    fresh = Dispatcher(dispatcher.pool, signer=dispatcher.signer)
    token = await dispatcher.issuer.encode(forged["another org"])
    with pytest.raises(errors.Unauthenticated):
        await fresh.authorize(token, a.task_id, a.attempt)
    await fresh.check_claims(good)
    assert (await fresh.authorize(a.capability_token, a.task_id, 1)).org_id == good.org_id


async def test_claim_next_and_complete_many(dispatcher: Dispatcher) -> None:
    await dispatcher.create_tasks([wire.CreateTaskRequest(operator="noop") for _ in range(50)])
    grants = await dispatcher.claim_next(100)
    assert len(grants) == 50 and not await dispatcher.claim_next(10)
    reqs = [
        wire.CompleteRequest(task_id=g.task_id, attempt=g.attempt, lease_token=g.lease_token)
        for g in grants
    ]
    stale = wire.CompleteRequest(
        task_id=grants[0].task_id,
        attempt=grants[0].attempt,
        lease_token="00000000-0000-4000-8000-000000000000",
    )
    results = await dispatcher.complete_many([*reqs[1:], stale])
    assert all(isinstance(r, wire.CompleteResponse) for r in results[:-1])
    assert isinstance(results[-1], errors.LeaseLost)
    assert (await dispatcher.counts()) == {"completed": 49, "running": 1}


async def test_reaper_rewakes_a_queued_task_whose_wakeup_was_lost(
    dispatcher: Dispatcher, db_url: str
) -> None:
    task_id = await _create(dispatcher)
    await dispatcher.publish_outbox_once()
    assert dispatcher.queue is not None
    (msg,) = await dispatcher.queue.receive(max_messages=10)
    await dispatcher.queue.delete([msg.receipt])  # the wake-up is gone, the task still queued
    assert (await dispatcher.reap_once()).rewoken == 0  # not stale yet
    sql(
        db_url,
        "UPDATE tasks SET updated_at = now() - interval '1 hour' WHERE task_id = %s",
        (task_id,),
    )
    assert (await dispatcher.reap_once()).rewoken == 1
    await dispatcher.publish_outbox_once()
    (again,) = await dispatcher.queue.receive(max_messages=10)
    assert json.loads(again.body) == {"task_id": task_id}
    assert (await dispatcher.reap_once()).rewoken == 0  # touched: not re-woken every pass


def _age_attempt(db_url: str, task_id: str, seconds: int) -> None:
    """As if ``seconds`` passed since the current attempt started and last heartbeat."""
    sql(
        db_url,
        "UPDATE task_attempts a SET started_at = a.started_at - make_interval(secs => %s) "
        "FROM tasks t WHERE a.task_id = t.task_id AND a.attempt = t.attempt AND t.task_id = %s",
        (seconds, task_id),
    )
    sql(
        db_url,
        "UPDATE tasks SET lease_expires_at = lease_expires_at - make_interval(secs => %s) "
        "WHERE task_id = %s",
        (seconds, task_id),
    )


async def test_an_attempt_heartbeating_past_its_timeout_is_timed_out_and_retried(
    dispatcher: Dispatcher, db_url: str
) -> None:
    """The Dispatcher enforces ``timeout_s`` itself (#7 item 5): the lease never outlives the
    attempt's budget, the reaper ends it ``timed_out`` and retries it, and every late write
    from it gets 409."""
    task_id = await _create(dispatcher, timeout_s=30, max_attempts=2)
    claim = await dispatcher.claim(task_id)
    f = _fence(claim)
    beat = await dispatcher.heartbeat(wire.HeartbeatRequest(**f))  # the worker is alive
    assert beat.lease_expires_at == claim.lease_expires_at  # capped at started_at + 30 s
    _age_attempt(db_url, task_id, 25)  # 25 s in: still within budget, heartbeats go on
    await dispatcher.heartbeat(wire.HeartbeatRequest(**f))
    assert (await dispatcher.reap_once()).expired == 0
    _age_attempt(db_url, task_id, 10)  # 35 s in: past timeout_s, lease capped at it
    assert (await dispatcher.reap_once()).expired == 1
    task = await dispatcher.get_task(task_id)
    # retried per policy (the fixture's backoff is 0 s, so the same pass made it due again)
    assert task["state"] == "queued" and task["error"]["code"] == "timed_out"
    assert [a["outcome"] for a in task["attempts"]] == ["timed_out"]
    for late in (
        dispatcher.heartbeat(wire.HeartbeatRequest(**f)),
        dispatcher.emit_events(wire.EventsRequest(**f, events=[wire.EventIn("k", "t", {})])),
        dispatcher.complete(wire.CompleteRequest(**f, result={"late": True})),
    ):
        with pytest.raises(errors.LeaseLost):
            await late
    second = await dispatcher.claim(task_id)
    assert second.attempt == 2
    _age_attempt(db_url, task_id, 31)
    assert (await dispatcher.reap_once()).expired == 1
    task = await dispatcher.get_task(task_id)
    assert task["state"] == "failed" and task["error"]["code"] == "timed_out"  # none left
    assert task["finished_at"] is not None


async def test_late_success_clears_the_reapers_error(dispatcher: Dispatcher, db_url: str) -> None:
    task_id = await _create(dispatcher, max_attempts=1)
    f = _fence(await dispatcher.claim(task_id))
    _expire(db_url, task_id)
    await dispatcher.reap_once()
    assert (await dispatcher.get_task(task_id))["state"] == "failed"
    assert (await dispatcher.complete(wire.CompleteRequest(**f))).state == "completed"
    task = await dispatcher.get_task(task_id)
    assert task["state"] == "completed" and task["error"] is None


async def test_fetch_names_the_callers_staging_prefix(dispatcher: Dispatcher) -> None:
    task_id = await _create(dispatcher)
    await dispatcher.claim(task_id)
    p1 = await dispatcher.fetch(task_id, 1)
    p3 = await dispatcher.fetch(task_id, 3)
    assert p1.staging_prefix.endswith("/attempt/1/") and p3.staging_prefix.endswith("/attempt/3/")


async def test_background_loops_publish_wakes_and_reap_on_real_queue(db_url: str) -> None:
    """The dispatcher's own loops (LISTEN-driven outbox publisher + reaper) over a PgQueue."""
    from trace_lite.pg_queue import PgQueue

    pool = await open_pool(db_url, min_size=1, max_size=4)
    queue = PgQueue(pool, "tasks")
    d = Dispatcher(
        pool, signer=MemorySigner(), queue=queue, retry=RetryPolicy(base_s=0.0), rand=lambda: 0.5
    )
    stop = asyncio.Event()
    loops = asyncio.create_task(d.run_background(stop, reap_every_s=0.05))
    try:
        ids = {
            i.task_id
            for i in await d.create_tasks(
                [wire.CreateTaskRequest(operator="noop") for _ in range(20)]
            )
        }
        got: set[str] = set()
        async with asyncio.timeout(10):
            while got != ids:
                for m in await queue.receive(max_messages=10, wait_seconds=1):
                    got.add(json.loads(m.body)["task_id"])
                    await queue.delete([m.receipt])
        # a lease that expires is reaped and the task woken again by the loops alone
        task_id = next(iter(ids))
        await d.claim(task_id)
        _expire(db_url, task_id)
        async with asyncio.timeout(10):
            while True:
                msgs = await queue.receive(max_messages=10, wait_seconds=1)
                if any(json.loads(m.body)["task_id"] == task_id for m in msgs):
                    break
        assert (await d.claim(task_id)).attempt == 2
    finally:
        stop.set()
        await loops
        await queue.close()
        await pool.close()


async def test_claims_run_on_the_claim_pool_with_its_5s_statement_timeout(db_url: str) -> None:
    pool = await open_pool(db_url, min_size=1, max_size=2)
    claim_pool = await open_pool(db_url, min_size=1, max_size=2, role="claim")
    try:
        async with claim_pool.connection() as conn:
            assert (await (await conn.execute("SHOW statement_timeout")).fetchone()) == ("5s",)
        async with pool.connection() as conn:
            assert (await (await conn.execute("SHOW statement_timeout")).fetchone()) == ("30s",)
        d = Dispatcher(pool, signer=MemorySigner(), queue=MemoryQueue("t"), claim_pool=claim_pool)
        await claim_pool.close()  # claims must go through the claim pool: now they cannot
        (info,) = await d.create_tasks([wire.CreateTaskRequest(operator="noop")])
        with pytest.raises(errors.Unavailable):  # the closed claim pool refuses
            await d.claim(info.task_id)
        assert (await d.get_task(info.task_id))["state"] == "queued"  # the main pool still works
    finally:
        await pool.close()
