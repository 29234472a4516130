"""Batch claims and group-committed completions on real Postgres."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any, NamedTuple

import attrs
import psycopg
import pytest

import trace_lite.task_completions
from trace_core import errors, wire
from trace_core.testing import MemoryQueue, MemorySigner
from trace_lite.batching import CompletionBatcher
from trace_lite.dispatcher import Dispatcher, open_pool
from trace_lite.pg import fetch_named, transaction


@pytest.fixture
async def dispatcher(db_url: str) -> AsyncIterator[Dispatcher]:
    pool = await open_pool(db_url, min_size=1, max_size=4)
    try:
        yield Dispatcher(pool, signer=MemorySigner(), queue=MemoryQueue("tasks"))
    finally:
        await pool.close()


async def test_claim_many_claims_what_it_can_and_says_why_not(dispatcher: Dispatcher) -> None:
    infos = await dispatcher.create_tasks(
        [wire.CreateTaskRequest(operator="noop", payload={"i": i}) for i in range(5)]
    )
    ids = [i.task_id for i in infos]
    await dispatcher.cancel(ids[0])
    await dispatcher.claim(ids[1])
    missing = "00000000-0000-4000-8000-000000000000"
    batch = await dispatcher.claim_many([*ids, ids[2], missing], "w")
    assert sorted(g.claim.task_id for g in batch.claims) == sorted(ids[2:])
    assert {r.task_id: r.error for r in batch.refused} == {
        ids[0]: "task_canceled",
        ids[1]: "task_not_claimable",
        missing: "not_found",
    }
    for g in batch.claims:
        assert g.task.status == "running" and g.task.attempt == g.claim.attempt == 1
        assert g.task.payload["i"] in (2, 3, 4)
        assert g.task.staging_prefix.endswith(f"/task/{g.claim.task_id}/attempt/1/")
        claims = await dispatcher.authorize(g.claim.capability_token, g.claim.task_id, 1)
        assert claims.task_id == g.claim.task_id


async def test_group_commit_batches_concurrent_completions(dispatcher: Dispatcher) -> None:
    await dispatcher.create_tasks([wire.CreateTaskRequest(operator="noop") for _ in range(60)])
    grants = await dispatcher.claim_next(60)
    batcher = CompletionBatcher(dispatcher)
    reqs = [
        wire.CompleteRequest(task_id=g.task_id, attempt=g.attempt, lease_token=g.lease_token)
        for g in grants
    ]
    stale = wire.CompleteRequest(
        task_id=grants[0].task_id, attempt=1, lease_token="00000000-0000-4000-8000-000000000000"
    )
    twice = reqs[1]
    results = await asyncio.gather(
        *(batcher.complete(r) for r in [*reqs, stale, twice]), return_exceptions=True
    )
    await batcher.close()
    assert all(
        isinstance(r, wire.CompleteResponse) and r.state == "completed" for r in results[:60]
    )
    assert isinstance(results[60], errors.LeaseLost)
    assert isinstance(results[61], wire.CompleteResponse) and results[61].replay
    assert len(batcher.batch_sizes) < 10  # 62 requests, a handful of transactions
    assert sum(batcher.batch_sizes) == 62
    assert await dispatcher.counts() == {"completed": 60}


async def test_group_commit_reports_a_failed_transaction_to_every_caller() -> None:
    class Down:
        async def complete_many(self, reqs: list[wire.CompleteRequest]) -> list[object]:
            raise errors.Unavailable("database down")

    batcher = CompletionBatcher(Down())  # type: ignore[arg-type]
    reqs = [
        wire.CompleteRequest(
            task_id=f"00000000-0000-4000-8000-00000000000{i}",
            attempt=1,
            lease_token="00000000-0000-4000-8000-000000000000",
        )
        for i in range(3)
    ]
    results = await asyncio.gather(*(batcher.complete(r) for r in reqs), return_exceptions=True)
    await batcher.close()
    assert all(isinstance(r, errors.Unavailable) for r in results)


def test_pg_array_literals_refuse_values_that_need_quoting() -> None:
    from datetime import UTC, datetime

    from trace_lite.dispatcher import pg_array

    ts = datetime(2026, 1, 1, tzinfo=UTC)
    assert pg_array(["a", 1, None, ts]) == "{a,1,NULL,2026-01-01T00:00:00+00:00}"
    assert pg_array([]) == "{}"
    for bad in (["a,b"], ['a"'], ["a b"], ["{x}"], ["a\\b"], [""]):
        with pytest.raises(ValueError):
            pg_array(bad)


async def test_complete_many_answers_not_found_for_unknown_tasks(dispatcher: Dispatcher) -> None:
    missing = wire.CompleteRequest(
        task_id="00000000-0000-4000-8000-00000000abcd",
        attempt=1,
        lease_token="00000000-0000-4000-8000-000000000000",
    )
    (res,) = await dispatcher.complete_many([missing])
    assert isinstance(res, errors.NotFound) and res.field == "task_id"


def _deep(levels: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(levels):
        value = {"a": value}
    return value


#: Results PostgreSQL's jsonb refuses, each of which used to fail its whole group commit.
POISON_RESULTS: dict[str, dict[str, Any]] = {
    "nul": {"s": "a\x00b"},
    "nul in a key": {"k\x00": 1},
    "lone surrogate": {"s": "\ud800"},
    "nan": {"x": float("nan")},
    "infinity": {"x": float("inf")},
    "600 deep": _deep(600),
}


async def _running(d: Dispatcher, n: int, org: str) -> list[wire.CompleteRequest]:
    infos = await d.create_tasks([wire.CreateTaskRequest(operator="noop", org=org)] * n)
    grants = [await d.claim(i.task_id) for i in infos]
    return [
        wire.CompleteRequest(
            task_id=g.task_id, attempt=g.attempt, lease_token=g.lease_token, result={"ok": 1}
        )
        for g in grants
    ]


async def _states(d: Dispatcher, reqs: list[wire.CompleteRequest]) -> list[str]:
    return [(await d.get_task(r.task_id))["state"] for r in reqs]


@pytest.mark.parametrize("poison", sorted(POISON_RESULTS))
async def test_one_poisoned_completion_never_fails_its_neighbours(
    dispatcher: Dispatcher, poison: str
) -> None:
    """N valid completions from two orgs and one poisoned one, in every position of the batch:
    the N complete, the poisoned one alone is refused (#8 item 1), in-process and through the
    group-commit batcher."""
    n = 4
    for position in range(n + 1):
        for path in ("complete_many", "batcher"):
            good = [
                *await _running(dispatcher, n // 2, "org-a"),
                *await _running(dispatcher, n - n // 2, "org-b"),
            ]
            (bad,) = await _running(dispatcher, 1, "org-a")
            bad = attrs.evolve(bad, result=POISON_RESULTS[poison])
            batch = [*good[:position], bad, *good[position:]]
            if path == "complete_many":
                results: list[Any] = await dispatcher.complete_many(batch)
            else:
                batcher = CompletionBatcher(dispatcher)
                results = await asyncio.gather(
                    *(batcher.complete(r) for r in batch), return_exceptions=True
                )
                await batcher.close()
                assert batcher.batch_sizes == [n + 1]  # they really shared one group commit
            refused = results.pop(position)
            assert isinstance(refused, errors.ValidationFailed), (path, position, refused)
            assert refused.field is not None and refused.field.startswith("result")
            assert all(
                isinstance(r, wire.CompleteResponse) and r.state == "completed" for r in results
            ), (path, position, results)
            assert await _states(dispatcher, good) == ["completed"] * n
            assert await _states(dispatcher, [bad]) == ["running"]  # nothing written


async def test_a_bad_value_that_reaches_sql_fails_only_its_own_completion(
    dispatcher: Dispatcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If a value the edge check misses fails the shared transaction, each completion is retried
    alone: only the bad one is refused, and as a bad value (never ``unavailable``)."""
    monkeypatch.setattr(trace_lite.task_completions, "_check_completion", lambda req: None)
    good = await _running(dispatcher, 3, "org-a")
    (nul,) = await _running(dispatcher, 1, "org-b")
    (nan,) = await _running(dispatcher, 1, "org-b")
    nul = attrs.evolve(nul, result={"s": "a\x00b"})
    nan = attrs.evolve(nan, result={"x": float("nan")})
    results = await dispatcher.complete_many([good[0], nul, good[1], nan, good[2]])
    assert isinstance(results[1], errors.ValidationFailed)
    assert isinstance(results[3], errors.ValidationFailed)
    assert "\\u0000" not in results[1].message and "jsonb" not in results[1].message
    assert [type(r) for r in (results[0], results[2], results[4])] == [wire.CompleteResponse] * 3
    assert await _states(dispatcher, good) == ["completed"] * 3
    assert await _states(dispatcher, [nul, nan]) == ["running", "running"]


def _store_deep_payload(db_url: str, task_id: str, levels: int = 900) -> None:
    """Write a payload no API accepts any more straight into the database."""
    deep = '{"a":' * levels + "1" + "}" * levels
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("UPDATE tasks SET payload = %s::jsonb WHERE task_id = %s", (deep, task_id))


async def test_a_claim_answers_every_task_it_commits_even_with_an_unservable_payload(
    dispatcher: Dispatcher, db_url: str
) -> None:
    """A payload that cannot be served fails its task inside the claim's transaction: the
    others are claimed and answered, nothing is left running that nobody was told about
    (#8 item 4), and inspection and fetch report it instead of crashing."""
    infos = await dispatcher.create_tasks([wire.CreateTaskRequest(operator="noop")] * 3)
    ids = [i.task_id for i in infos]
    _store_deep_payload(db_url, ids[1])
    batch = await dispatcher.claim_many(ids, "w")
    json.dumps(wire.unstructure(batch))  # the whole answer can be sent
    assert sorted(g.claim.task_id for g in batch.claims) == sorted([ids[0], ids[2]])
    (refusal,) = batch.refused
    assert (refusal.task_id, refusal.error) == (ids[1], "task_not_claimable")
    assert "payload cannot be served" in refusal.message
    task = await dispatcher.get_task(ids[1])
    assert task["state"] == "failed" and task["attempts"] == []
    assert task["error"]["code"] == "payload_unservable"
    assert "unservable" in task["payload"]
    json.dumps(task)
    with pytest.raises(errors.Conflict):
        await dispatcher.fetch(ids[1])
    assert await dispatcher.counts() == {"running": 2, "failed": 1}
    # the in-process path the same way
    (info,) = await dispatcher.create_tasks([wire.CreateTaskRequest(operator="noop")])
    _store_deep_payload(db_url, info.task_id)
    assert await dispatcher.claim_next(5) == []
    assert (await dispatcher.get_task(info.task_id))["state"] == "failed"


async def test_a_claim_whose_answer_cannot_be_built_claims_nothing(
    dispatcher: Dispatcher,
) -> None:
    """Tokens are signed before the claim commits: a signer failure leaves every task queued."""
    infos = await dispatcher.create_tasks([wire.CreateTaskRequest(operator="noop")] * 2)
    assert isinstance(dispatcher.signer, MemorySigner)
    dispatcher.signer.fail_next_sign(errors.SignerError("signer down"))
    with pytest.raises(errors.SignerError):
        await dispatcher.claim_many([i.task_id for i in infos], "w")
    assert await dispatcher.counts() == {"queued": 2}
    assert len((await dispatcher.claim_many([i.task_id for i in infos], "w")).claims) == 2


async def test_rows_are_matched_to_their_fields_by_name(dispatcher: Dispatcher) -> None:
    """``fetch_named`` (every task query's reader) maps columns by name, in any order, and
    refuses a query whose columns are not exactly the row's fields."""

    class Pair(NamedTuple):
        a: int
        b: str

    async with transaction(dispatcher.pool) as cur:
        assert await fetch_named(cur, Pair, "SELECT 'x' AS b, 1 AS a", {}) == [Pair(1, "x")]
        assert await fetch_named(cur, Pair, "SELECT 1 AS a, 'x' AS b", {}) == [Pair(1, "x")]
        with pytest.raises(TypeError):
            await fetch_named(cur, Pair, "SELECT 1 AS a, 'x' AS c", {})
