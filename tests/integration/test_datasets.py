"""Datasets on real Postgres and the real LocalObjectStore: the attempt-fenced commit protocol,
replace/append, atomic pointer sets under concurrent readers, purge, staging cleanup."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import psycopg
import pytest

from pg_sql import sql
from trace_core import errors, wire
from trace_core.lifecycle import RetryPolicy
from trace_core.testing import MemoryQueue, MemorySigner
from trace_lite.datasets import Datasets
from trace_lite.dispatcher import Dispatcher, open_pool
from trace_lite.local_store import LocalObjectStore

ORG = "acme"
DAG = "prices"


@attrs.define
class Env:
    d: Dispatcher
    ds: Datasets
    store: LocalObjectStore
    db_url: str
    versions: dict[str, str]

    def sql(self, query: str, params: Any = None) -> list[tuple[Any, ...]]:
        return sql(self.db_url, query, params)


@pytest.fixture
async def env(db_url: str, tmp_path: Path) -> AsyncIterator[Env]:
    pool = await open_pool(db_url, min_size=2, max_size=12)
    store = LocalObjectStore(tmp_path / "objects", "http://127.0.0.1:1", b"s" * 32)
    d = Dispatcher(
        pool,
        signer=MemorySigner(),
        queue=MemoryQueue("tasks"),
        object_store=store,
        retry=RetryPolicy(max_attempts=3, base_s=0.0),
        rand=lambda: 0.5,
    )
    ds = Datasets(pool, object_store=store)
    await ds.ensure_dag(ORG, DAG, deployers=["dave"])
    versions = {}
    for name, strategy in (("blocks", "replace"), ("logs", "append")):
        await ds.register(ORG, name, dag=DAG, job="ingest", update_strategy=strategy)
        versions[name] = await ds.open_version(None, ORG, name)
    await ds.cutover(None, ORG, DAG, versions)
    try:
        yield Env(d, ds, store, db_url, versions)
    finally:
        await pool.close()


async def _claim(env: Env, org: str = ORG) -> tuple[dict[str, Any], str]:
    (info,) = await env.d.create_tasks([wire.CreateTaskRequest(operator="stage", org=org)])
    c = await env.d.claim(info.task_id)
    payload = await env.d.fetch(info.task_id, c.attempt)
    fence = {"task_id": c.task_id, "attempt": c.attempt, "lease_token": c.lease_token}
    return fence, payload.staging_prefix


async def _stage(
    env: Env, object_key: str, body: Any, dataset: str = "blocks", **partition: Any
) -> dict[str, Any]:
    data = json.dumps(body).encode()
    await env.store.put(object_key, data)
    return {
        "dataset": dataset,
        "object_key": object_key,
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "partition": partition,
    }


def _complete(fence: dict[str, Any], outputs: list[dict[str, Any]]) -> wire.CompleteRequest:
    return wire.structure({**fence, "outputs": outputs}, wire.CompleteRequest)


async def _live(env: Env, name: str = "blocks", *, promote: bool = True) -> list[tuple[Any, ...]]:
    """What a reader is handed, after promotion has run (unless ``promote`` is false)."""
    while promote and await env.ds.promote_once():
        pass
    caller = await env.ds.user_caller(ORG, "dave")
    res = await env.ds.resolve(caller, ORG, [name], pin_ttl_s=0)
    return [
        (o.get("start"), o.get("end"), o.get("key"), o["object_key"])
        for o in res.datasets[0].objects
    ]


async def test_commit_is_visible_only_after_the_fenced_completion(env: Env) -> None:
    fence, prefix = await _claim(env)
    out = await _stage(env, f"{prefix}blocks/0_100.json", {"rows": 1}, start=0, end=100)
    assert await _live(env) == []  # staged, not committed: invisible
    req = _complete(fence, [out])
    done = await env.d.complete(req)
    assert done.state == "completed" and not done.replay
    # committed, not yet verified and promoted: a reader is told it is pending, never handed
    # the staged key (its producer could still hold a way to write there)
    assert await _live(env, promote=False) == []
    caller = await env.ds.user_caller(ORG, "dave")
    (resolved,) = (await env.ds.resolve(caller, ORG, ["blocks"], pin_ttl_s=0)).datasets
    assert (resolved.pending, resolved.corrupt) == (1, 0)
    # a replay of the same completion commits nothing twice
    assert (await env.d.complete(req)).replay
    assert env.sql("SELECT count(*) FROM dataset_partitions")[0][0] == 1
    # promotion copies it under the version prefix (UUIDs only) and readers follow
    assert await env.ds.promote_once() == 1
    assert env.sql("SELECT state FROM dataset_partitions") == [("promoted",)]
    (row,) = await _live(env)
    org_id = env.sql("SELECT org_id::text FROM orgs WHERE name = %s", (ORG,))[0][0]
    uuid_ = env.sql("SELECT dataset_uuid::text FROM datasets WHERE name = 'blocks'")[0][0]
    assert row[3].startswith(f"org/{org_id}/dataset/{uuid_}/version/{env.versions['blocks']}/")
    assert "/0_100." in row[3] and "blocks" not in row[3].split("/version/")[1]
    assert await env.store.get(row[3]) == json.dumps({"rows": 1}).encode()


async def test_stale_attempt_manifest_is_refused_and_nothing_is_visible(env: Env) -> None:
    old, old_prefix = await _claim(env)
    out = await _stage(env, f"{old_prefix}blocks/0_100.json", {"old": True}, start=0, end=100)
    env.sql(
        "UPDATE tasks SET lease_expires_at = now() - interval '1s' WHERE task_id = %s",
        (old["task_id"],),
    )
    await env.d.reap_once()
    new = await env.d.claim(old["task_id"])
    assert new.attempt == 2
    with pytest.raises(errors.LeaseLost):
        await env.d.complete(_complete(old, [out]))
    assert await _live(env) == []
    assert env.sql("SELECT count(*) FROM dataset_partitions")[0][0] == 0
    assert env.sql("SELECT count(*) FROM outbox WHERE topic LIKE 'dataset%'")[0][0] == 0


@pytest.mark.parametrize(
    "where",
    [
        "other_attempt",
        "other_task",
        "other_org",
        "version_prefix",
        "dotdot",
        "encoded",
        "absolute",
        "backslash",
        "prefix_sibling",
    ],
)
async def test_manifest_outside_the_staging_prefix_is_refused(env: Env, where: str) -> None:
    fence, prefix = await _claim(env)
    org_id, task_id = prefix.split("/")[1], fence["task_id"]
    other, other_prefix = await _claim(env)
    keys = {
        "other_attempt": f"org/{org_id}/staging/task/{task_id}/attempt/2/blocks/0_100.json",
        "other_task": f"{other_prefix}blocks/0_100.json",
        "other_org": prefix.replace(org_id, "00000000-0000-4000-8000-000000000000")
        + "blocks/0_100.json",
        "version_prefix": f"org/{org_id}/dataset/x/version/{env.versions['blocks']}/0_100.json",
        "dotdot": f"{prefix}../../../{other['task_id']}/attempt/1/blocks/0_100.json",
        "encoded": f"{prefix}%2e%2e/%2e%2e/blocks/0_100.json",
        "absolute": f"/{prefix}blocks/0_100.json",
        "backslash": f"{prefix}..\\..\\0_100.json",
        "prefix_sibling": prefix.rstrip("/") + "0/blocks/0_100.json",
    }
    key = keys[where]
    data = b"{}"
    with_store = where in (
        "other_attempt",
        "other_task",
        "other_org",
        "version_prefix",
        "prefix_sibling",
    )
    if with_store:
        await env.store.put(key, data)
    out = {
        "dataset": "blocks",
        "object_key": key,
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "partition": {"start": 0, "end": 100},
    }
    with pytest.raises(errors.UnsafeKey) as info:
        await env.d.complete(_complete(fence, [out]))
    assert info.value.field == "outputs[0].object_key"
    assert env.sql("SELECT count(*) FROM dataset_partitions")[0][0] == 0
    task = await env.d.get_task(task_id)
    assert task["state"] == "running"  # the completion was refused as a whole


async def test_manifest_must_match_the_staged_object(env: Env) -> None:
    fence, prefix = await _claim(env)
    out = await _stage(env, f"{prefix}blocks/0_100.json", {"a": 1}, start=0, end=100)
    cases = [
        ({**out, "size": out["size"] + 1}, "outputs[0].size"),
        ({**out, "sha256": "0" * 64}, "outputs[0].sha256"),
        ({**out, "object_key": f"{prefix}blocks/missing.json"}, "outputs[0].object_key"),
        ({**out, "dataset": "nope"}, "outputs[0].dataset"),
        ({**out, "partition": {"start": 5, "end": 5}}, "outputs[0].partition"),
    ]
    for bad, field in cases:
        with pytest.raises((errors.ValidationFailed, errors.NotFound)) as info:
            await env.d.complete(_complete(fence, [bad]))
        assert info.value.field == field, (bad, info.value)
    assert env.sql("SELECT count(*) FROM dataset_partitions")[0][0] == 0
    assert (await env.d.complete(_complete(fence, [out]))).state == "completed"


async def test_replace_supersedes_exactly_the_rewritten_range_with_one_invalidation(
    env: Env,
) -> None:
    fence, prefix = await _claim(env)
    outs = [
        await _stage(
            env, f"{prefix}blocks/{s}_{s + 100}.json", {"v": 1, "s": s}, start=s, end=s + 100
        )
        for s in (0, 100, 200)
    ]
    await env.d.complete(_complete(fence, outs))
    before = {(s, e): k for s, e, _, k in await _live(env)}
    fence2, prefix2 = await _claim(env)
    out = await _stage(env, f"{prefix2}blocks/100_200.json", {"v": 2}, start=100, end=200)
    await env.d.complete(_complete(fence2, [out]))
    after = {(s, e): k for s, e, _, k in await _live(env)}
    assert sorted(after) == [(0, 100), (100, 200), (200, 300)]
    assert after[(0, 100)] == before[(0, 100)] and after[(200, 300)] == before[(200, 300)]
    assert f"/100_200.{fence2['task_id']}.a1." in after[(100, 200)]  # the promoted rewrite
    assert env.sql("SELECT count(*) FROM dataset_partitions WHERE superseded_at IS NOT NULL") == [
        (1,)
    ]
    inval = env.sql("SELECT payload FROM outbox WHERE topic = 'dataset.invalidate'")
    assert len(inval) == 1
    p = inval[0][0]
    assert (p["start"], p["end"], p["superseded"], p["dataset_version"]) == (
        100,
        200,
        1,
        env.versions["blocks"],
    )
    # a replace that would cut a live partition in half is refused, nothing written
    fence3, prefix3 = await _claim(env)
    half = await _stage(env, f"{prefix3}blocks/150_250.json", {}, start=150, end=250)
    with pytest.raises(errors.ValidationFailed):
        await env.d.complete(_complete(fence3, [half]))
    assert {(s, e) for s, e, _, _ in await _live(env)} == set(after)


async def test_append_with_duplicate_keys_stores_each_key_once(env: Env) -> None:
    fence, prefix = await _claim(env)
    outs = [
        await _stage(env, f"{prefix}logs/{k}.json", {"k": k}, dataset="logs", key=k)
        for k in ("a", "b")
    ]
    dup = await _stage(env, f"{prefix}logs/a2.json", {"k": "a"}, dataset="logs", key="a")
    await env.d.complete(_complete(fence, [*outs, dup]))
    fence2, prefix2 = await _claim(env)
    again = [
        await _stage(env, f"{prefix2}logs/{k}.json", {"k": k}, dataset="logs", key=k)
        for k in ("b", "c")
    ]
    await env.d.complete(_complete(fence2, again))
    live = await _live(env, "logs")
    assert sorted(k for _, _, k, _ in live) == ["a", "b", "c"]
    assert env.sql("SELECT count(*) FROM dataset_partitions WHERE superseded_at IS NOT NULL") == [
        (0,)
    ]
    assert env.sql("SELECT count(*) FROM outbox WHERE topic = 'dataset.invalidate'") == [(0,)]


async def test_concurrent_readers_see_whole_pointer_sets_during_cutover_and_rollback(
    env: Env,
) -> None:
    names = ["blocks", "logs"]
    sets = [dict(env.versions)]
    for _ in range(2):
        sets.append({n: await env.ds.open_version(None, ORG, n) for n in names})
    allowed = {tuple(s[n] for n in names) for s in sets}
    caller = await env.ds.user_caller(ORG, "dave")
    stop = asyncio.Event()
    seen: list[tuple[str | None, ...]] = []

    async def reader() -> None:
        while not stop.is_set():
            res = await env.ds.resolve(caller, ORG, names, pin_ttl_s=0)
            seen.append(tuple(r.dataset_version for r in res.datasets))

    async def writer() -> None:
        for i in range(60):
            await env.ds.cutover(None, ORG, DAG, sets[1 + i % 2])
            await asyncio.sleep(0)
            if i % 3 == 0:
                await env.ds.rollback(None, ORG, DAG)
        stop.set()

    await asyncio.gather(writer(), *(reader() for _ in range(8)))
    assert len(seen) > 100
    mixed = [s for s in seen if s not in allowed]
    assert mixed == []
    assert len(set(seen)) >= 2


async def test_purge_refuses_active_and_pinned_versions_and_frees_storage(env: Env) -> None:
    old = env.versions["blocks"]
    fence, prefix = await _claim(env)
    out = await _stage(env, f"{prefix}blocks/0_100.json", {"x": "y" * 100}, start=0, end=100)
    await env.d.complete(_complete(fence, [out]))
    await env.ds.promote_once()
    with pytest.raises(errors.Conflict, match="active"):
        await env.ds.purge(None, ORG, "blocks", old)
    caller = await env.ds.user_caller(ORG, "dave")
    pinned = await env.ds.resolve(caller, ORG, ["blocks"], pin_ttl_s=60)
    new = await env.ds.open_version(None, ORG, "blocks")
    await env.ds.cutover(None, ORG, DAG, {"blocks": new})
    with pytest.raises(errors.Conflict, match="pinned"):
        await env.ds.purge(None, ORG, "blocks", old)
    await env.ds.release_pin(caller, ORG, pinned.pin_id)
    keys = env.sql("SELECT object_key, staged_key FROM dataset_partitions")[0]
    report = await env.ds.purge(None, ORG, "blocks", old)
    assert report.deleted_objects == 2 and report.freed_bytes == 2 * out["size"]
    for k in keys:
        with pytest.raises(errors.NotFound):
            await env.store.head(k)
    assert env.sql("SELECT state FROM dataset_versions WHERE dataset_version = %s", (old,)) == [
        ("purged",)
    ]
    assert env.sql("SELECT count(*) FROM dataset_partitions") == [(0,)]
    # the previous pointer set names the purged version: rollback refuses
    with pytest.raises(errors.Conflict, match="purged"):
        await env.ds.rollback(None, ORG, DAG)


async def test_clean_staging_deletes_only_uncommitted_attempts_after_the_grace(env: Env) -> None:
    failed, failed_prefix = await _claim(env)
    await _stage(env, f"{failed_prefix}blocks/0_100.json", {}, start=0, end=100)
    env.sql(
        "UPDATE tasks SET lease_expires_at = now() - interval '1s' WHERE task_id = %s",
        (failed["task_id"],),
    )
    await env.d.reap_once()
    new = await env.d.claim(failed["task_id"])
    payload = await env.d.fetch(new.task_id, new.attempt)
    ok = await _stage(env, f"{payload.staging_prefix}blocks/0_100.json", {}, start=0, end=100)
    fence = {"task_id": new.task_id, "attempt": new.attempt, "lease_token": new.lease_token}
    await env.d.complete(_complete(fence, [ok]))
    assert (await env.ds.clean_staging(grace_s=3600)).attempts == 0  # inside the grace
    report = await env.ds.clean_staging(grace_s=0)
    assert report.attempts == 1 and report.deleted_objects == 1 and report.skipped == 1
    assert await env.store.list(failed_prefix) == []
    assert len(await env.store.list(payload.staging_prefix)) == 1  # committed, not promoted
    assert await env.ds.promote_once() == 1
    report = await env.ds.clean_staging(grace_s=0)
    assert report.attempts == 1 and report.deleted_objects == 1
    assert len(await _live(env)) == 1
    (row,) = await _live(env)
    assert await env.store.head(row[3])  # readers read the promoted copy


async def test_bytes_changed_after_the_commit_are_an_alarm_never_a_read(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    fence, prefix = await _claim(env)
    out = await _stage(env, f"{prefix}blocks/0_100.json", {"rows": 1}, start=0, end=100)
    gone = await _stage(env, f"{prefix}blocks/100_200.json", {"rows": 2}, start=100, end=200)
    await env.d.complete(_complete(fence, [out, gone]))
    await env.store.put(out["object_key"], b"tampered after the commit")
    await env.store.delete(gone["object_key"])
    with caplog.at_level(logging.ERROR, logger="trace.datasets"):
        assert await env.ds.promote_once() == 0
        assert await env.ds.promote_once() == 0  # marked once, not retried
    alarms = [r for r in caplog.records if "corrupt" in r.getMessage()]
    assert len(alarms) == 2 and all(r.levelno == logging.ERROR for r in alarms)
    assert {getattr(r, "staged_key", None) for r in alarms} == {
        out["object_key"],
        gone["object_key"],
    }
    assert env.sql("SELECT state FROM dataset_partitions") == [("corrupt",), ("corrupt",)]
    assert (await env.ds.partition_counts())["corrupt"] == 2
    from aiohttp.test_utils import TestClient, TestServer

    from trace_servers.app import make_app

    app = make_app(env.d, platform_token="p" * 16)
    async with TestClient(TestServer(app)) as client:
        metrics = await (await client.get("/metrics")).text()
    assert 'trace_dataset_partitions{state="corrupt"} 2.0' in metrics
    caller = await env.ds.user_caller(ORG, "dave")
    (resolved,) = (await env.ds.resolve(caller, ORG, ["blocks"], pin_ttl_s=0)).datasets
    assert resolved.objects == [] and resolved.corrupt == 2 and resolved.pending == 0
    # nothing was copied to a canonical key
    keys = [k for (k,) in env.sql("SELECT object_key FROM dataset_partitions")]
    for k in keys:
        with pytest.raises(errors.NotFound):
            await env.store.head(k)


def test_dataset_tables_live_in_the_schema_the_data_migrations_create(data_db_url: str) -> None:
    from trace_lite.datasets import DATA_SCHEMA, table_name

    name = table_name("185548cf-4273-4cbc-bcff-3baecca4f94f")
    assert name.split(".")[0] == DATA_SCHEMA
    with psycopg.connect(data_db_url, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {name} (block bigint)")  # fails if the schema is missing
        (found,) = conn.execute("SELECT to_regclass(%s)::text", (name,)).fetchone() or (None,)
    assert found == name


async def test_the_write_guard_allows_a_running_attempts_uncommitted_keys_only(env: Env) -> None:
    from trace_lite.write_guard import StagingWriteGuard

    guard = StagingWriteGuard(env.d.pool)
    fence, prefix = await _claim(env)
    await guard(f"{prefix}out/blocks/0_100.json")  # running, nothing committed: allowed
    org_id = prefix.split("/")[1]
    for key in (
        f"org/{org_id}/dataset/d/version/v/0_100.json",  # a canonical key is never PUT by URL
        "bundles/x.zip",
        prefix.replace(f"/attempt/{fence['attempt']}/", "/attempt/9/") + "x",  # no such attempt
        prefix.replace(fence["task_id"], "not-a-uuid") + "x",
        prefix.replace(org_id, "00000000-0000-4000-8000-000000000000") + "x",  # another org
    ):
        with pytest.raises(errors.Forbidden):
            await guard(key)
    # a published buffer batch is committed mid-attempt: its key is closed, the rest stays open
    rows = await _stage(env, f"{prefix}buffer/rows/b1.jsonl", {"n": 1})
    batch = {k: rows[k] for k in ("object_key", "size", "sha256")}
    await env.d.publish_buffer(
        wire.structure(
            {
                **fence,
                "batch": {
                    "key": "b1",
                    "dataset": "rows",
                    "object_key": batch["object_key"],
                    "row_count": 1,
                    "byte_size": batch["size"],
                    "sha256": batch["sha256"],
                },
            },
            wire.BufferPublishRequest,
        )
    )
    with pytest.raises(errors.Forbidden):
        await guard(batch["object_key"])
    await guard(f"{prefix}out/blocks/0_100.json")
    # the completion ends the attempt: every key of its prefix is closed
    out = await _stage(env, f"{prefix}out/blocks/0_100.json", {"rows": 1}, start=0, end=100)
    await env.d.complete(_complete(fence, [out]))
    for key in (out["object_key"], f"{prefix}out/other.json"):
        with pytest.raises(errors.Forbidden):
            await guard(key)


async def test_a_commit_wakes_promotion_without_waiting_for_its_timer(env: Env) -> None:
    stop = asyncio.Event()
    background = asyncio.create_task(env.ds.run_background(stop, every_s=3600, grace_s=3600))
    try:
        await asyncio.wait_for(env.ds.gc.listening.wait(), 10)
        fence, prefix = await _claim(env)
        out = await _stage(env, f"{prefix}blocks/0_100.json", {"rows": 1}, start=0, end=100)
        await env.d.complete(_complete(fence, [out]))

        # the timer is an hour: only the completion's notification can wake the pass (the
        # bound below is a deadlock guard, not a performance claim)
        for _ in range(400):
            if env.sql("SELECT state FROM dataset_partitions") == [("promoted",)]:
                break
            await asyncio.sleep(0.05)
        assert env.sql("SELECT state FROM dataset_partitions") == [("promoted",)]
    finally:
        stop.set()
        await background
