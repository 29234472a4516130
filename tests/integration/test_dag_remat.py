"""Rematerialization on real Postgres (``trace_lite.dag_remat``): a materialization-affecting
deploy stages its version with a new pointer set, rebuilds exactly the edited job and its
downstream while readers keep the old versions, holds the events arriving meanwhile, and cuts
over (version + pointer set) in one transaction when the rebuild is complete; the held events
then drain once. Execution-only edits go live at once; a rollback abandons a staging."""

from __future__ import annotations

import asyncio
import copy
import hashlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

import attrs
import pytest

from pg_sql import sql
from trace_core import errors, wire
from trace_core.testing import MemoryObjectStore, MemoryQueue, MemorySigner
from trace_lite.dag_control import DagControl
from trace_lite.dag_remat import DagRemat, rerun_payload
from trace_lite.dag_runs import DagRuns
from trace_lite.dags import Dags
from trace_lite.datasets import Datasets
from trace_lite.dispatcher import Dispatcher, open_pool
from trace_servers.dag_cli import builtin_operators, render_status

ORG = "acme"
REPLACE = {"storage": "object_store", "update_strategy": "replace"}

# src announces ranges (publishes raw); mid reads them (publishes mid_ds); down reads mid's
# events (publishes down_ds); side reads src too and is not downstream of mid
FLOW: dict[str, Any] = {
    "name": "flow",
    "jobs": {
        "src": {
            "operator": "noop",
            "config": {"chain": "a"},
            "triggers": [{"type": "manual"}],
            "outputs": [REPLACE],
        },
        "mid": {
            "operator": "noop",
            "config": {"rule": 1},
            "inputs": [{"from": {"job": "src"}}],
            "outputs": [REPLACE],
        },
        "down": {"operator": "noop", "inputs": [{"from": {"job": "mid"}}], "outputs": [REPLACE]},
        "side": {"operator": "noop", "inputs": [{"from": {"job": "src"}}]},
    },
    "publish": [
        {"job": "src", "output": 0, "dataset": "raw"},
        {"job": "mid", "output": 0, "dataset": "mid_ds"},
        {"job": "down", "output": 0, "dataset": "down_ds"},
    ],
}
DATASETS = ["raw", "mid_ds", "down_ds"]


def edited(**changes: Any) -> dict[str, Any]:
    """FLOW with ``{job: {field: value}}`` changed."""
    spec = copy.deepcopy(FLOW)
    for job, fields in changes.items():
        spec["jobs"][job].update(fields)
    return spec


@attrs.define
class World:
    d: Dispatcher
    dags: Dags
    runs: DagRuns
    remat: DagRemat
    control: DagControl
    ds: Datasets
    store: MemoryObjectStore
    db_url: str

    def sql(self, query: str, params: Any = None) -> list[tuple[Any, ...]]:
        return sql(self.db_url, query, params)

    def tasks(self, job: str, version: int | None = None, state: str | None = None) -> list[str]:
        rows = self.sql(
            "SELECT task_id::text FROM tasks WHERE dag_job = %s "
            "AND (%s::bigint IS NULL OR dag_version = %s) AND (%s::text IS NULL OR state = %s) "
            "ORDER BY created_at, task_id",
            [job, version, version, state, state],
        )
        return [r[0] for r in rows]

    async def versions(self) -> dict[str, str | None]:
        """What a reader resolves now: dataset -> version (one statement: a whole set)."""
        admin = await self.ds.user_caller(ORG, "ada")
        res = await self.ds.resolve(admin, ORG, DATASETS, pin_ttl_s=0)
        return {r.dataset: r.dataset_version for r in res.datasets}


@pytest.fixture
async def world(db_url: str) -> AsyncIterator[World]:
    pool = await open_pool(db_url, min_size=2, max_size=12)
    store = MemoryObjectStore()
    d = Dispatcher(pool, signer=MemorySigner(), queue=MemoryQueue("t"), object_store=store)
    ds = Datasets(pool, object_store=store)
    await ds.set_member(None, ORG, "ada", ["admin"])
    dags = Dags(pool, operators=builtin_operators())
    await dags.deploy(None, ORG, FLOW)
    try:
        yield World(d, dags, DagRuns(pool), DagRemat(pool), DagControl(pool), ds, store, db_url)
    finally:
        await pool.close()


async def run_task(
    w: World,
    task_id: str,
    *,
    dataset: str | None = None,
    ranges: Sequence[tuple[int, int]] = (),
) -> None:
    """Claim ``task_id``, commit one partition of ``dataset`` per range and announce each range
    as an event; then fan the events out."""
    c = await w.d.claim(task_id)
    fence = {"task_id": c.task_id, "attempt": c.attempt, "lease_token": c.lease_token}
    payload = await w.d.fetch(c.task_id, c.attempt)
    outputs = []
    for start, end in ranges if dataset else ():
        key = f"{payload.staging_prefix}{start}_{end}.json"
        data = f'{{"start": {start}, "task": "{task_id}"}}'.encode()
        await w.store.put(key, data)
        outputs.append(
            wire.OutputIn(
                dataset=dataset or "",
                object_key=key,
                size=len(data),
                sha256=hashlib.sha256(data).hexdigest(),
                partition=wire.PartitionIn(start=start, end=end),
            )
        )
    events = [
        wire.EventIn(key=f"range:{s}_{e}", type="range", payload={"start": s, "end": e})
        for s, e in ranges
    ]
    done = await w.d.complete(wire.CompleteRequest(**fence, outputs=outputs, final_events=events))
    assert done.state == "completed", done
    await w.runs.fan_out_once()


def range_of(w: World, task_id: str) -> tuple[int, int]:
    ((payload,),) = w.sql("SELECT payload FROM tasks WHERE task_id = %s", [task_id])
    ev = payload["event"]["payload"]
    return ev["start"], ev["end"]


async def run_all(w: World, job: str, version: int, dataset: str | None) -> int:
    """Run every queued task of ``job`` in ``version``, each passing its event's range on."""
    ids = w.tasks(job, version, "queued")
    for t in ids:
        await run_task(w, t, dataset=dataset, ranges=[range_of(w, t)])
    return len(ids)


async def built(w: World) -> None:
    """Version 1 with data: a run of src announcing two ranges, mid and down built from them."""
    out = await w.runs.trigger(None, ORG, "flow", "src", run_id="r1")
    await run_task(w, out["task_id"], dataset="raw", ranges=[(0, 10), (10, 20)])
    assert await run_all(w, "mid", 1, "mid_ds") == 2
    assert await run_all(w, "down", 1, "down_ds") == 2


async def test_a_materialization_edit_rebuilds_beside_the_live_version(world: World) -> None:
    await built(world)
    before = await world.versions()
    # edit mid's config: mid and down are rebuilt, src and side are not
    dep = await world.dags.deploy(None, ORG, edited(mid={"config": {"rule": 2}}))
    assert (dep.created, dep.version, dep.staged_version) == (True, 1, 2)
    assert (dep.rebuild, dep.rebuild_tasks) == (["down", "mid"], 2)
    # the replay: one staged mid task per event src announced, none of the other jobs yet
    assert len(world.tasks("mid", 2)) == 2 and world.tasks("down", 2) == []
    assert world.tasks("src", 2) == [] and world.tasks("side", 2) == []
    staged = world.sql(
        "SELECT p.dataset_uuid::text, p.dataset_version::text FROM dag_rematerializations m "
        "JOIN dag_pointers p ON p.dag_id = m.dag_id AND p.generation = m.generation"
    )
    names = dict(world.sql("SELECT dataset_uuid::text, name FROM datasets"))
    staged_versions = {names[u]: v for u, v in staged}
    # new versions for the rebuilt jobs' datasets only; readers still see the old set
    assert staged_versions["raw"] == before["raw"]
    assert staged_versions["mid_ds"] != before["mid_ds"]
    assert staged_versions["down_ds"] != before["down_ds"]
    assert await world.versions() == before

    # a new run of src while the staging builds: side gets it now, mid's event waits
    out = await world.runs.trigger(None, ORG, "flow", "src", run_id="r2")
    assert out["version"] == 1
    await run_task(world, out["task_id"], dataset="raw", ranges=[(20, 30)])
    assert len(world.tasks("side", 1)) == 3
    assert len(world.tasks("mid", 2)) == 2 and len(world.tasks("mid", 1)) == 2
    status = await world.control.status(None, ORG, "flow")
    assert status["active_version"] == 1
    rebuilding = status["rebuilding"]
    assert (rebuilding["version"], rebuilding["waiting_events"]) == (2, 1)
    assert rebuilding["jobs"]["mid"]["queued"] == 2 and not rebuilding["blocked"]
    assert "rebuilding version 2" in render_status(status)

    # the rebuild flows down the staged jobs and commits to the staged versions
    assert await run_all(world, "mid", 2, "mid_ds") == 2
    assert (await world.remat.cutover_once()) == []  # down is not rebuilt yet
    assert await world.versions() == before
    assert await run_all(world, "down", 2, "down_ds") == 2
    assert world.sql(
        "SELECT count(*) FROM dataset_partitions WHERE dataset_version = %s",
        [staged_versions["down_ds"]],
    ) == [(2,)]

    # complete: one transaction moves the version and the pointer set
    (cut,) = await world.remat.cutover_once()
    assert (cut.version, cut.from_version) == (2, 1)
    assert await world.versions() == staged_versions
    (status,) = [await world.control.status(None, ORG, "flow")]
    assert (status["active_version"], status["rebuilding"]) == (2, None)
    # the held event drains once against the new version
    await world.runs.fan_out_once()
    await world.runs.fan_out_once()
    assert len(world.tasks("mid", 2)) == 3
    assert [range_of(world, t) for t in world.tasks("mid", 2, "queued")] == [(20, 30)]
    # the upstream kept its version and its tasks: nothing of src or side was rebuilt
    assert len(world.tasks("src")) == 2 and len(world.tasks("side")) == 3
    assert world.sql("SELECT reason FROM dag_activations ORDER BY seq DESC LIMIT 1") == [
        ("cutover",)
    ]


async def test_readers_see_the_old_set_or_the_new_one_never_a_mix(world: World) -> None:
    await built(world)
    before = await world.versions()
    await world.dags.deploy(None, ORG, edited(mid={"config": {"rule": 2}}))
    await run_all(world, "mid", 2, "mid_ds")
    await run_all(world, "down", 2, "down_ds")
    seen: list[list[dict[str, str | None]]] = [[], [], []]
    stop = asyncio.Event()

    progress = asyncio.Condition()

    async def reader(mine: list[dict[str, str | None]]) -> None:
        while not stop.is_set():
            mine.append(await world.versions())
            async with progress:
                progress.notify_all()

    async def each_reads(more: int) -> None:
        """Until every reader completed ``more`` more resolves."""
        goal = [len(mine) + more for mine in seen]
        async with progress:
            await progress.wait_for(
                lambda: all(len(mine) >= g for mine, g in zip(seen, goal, strict=True))
            )

    readers = [asyncio.create_task(reader(mine)) for mine in seen]
    await each_reads(1)
    assert len(await world.remat.cutover_once()) == 1
    after = await world.versions()
    await each_reads(2)  # the second of these started after the cutover committed
    stop.set()
    await asyncio.gather(*readers)
    assert after != before and after["raw"] == before["raw"]
    for mine in seen:
        # each reader saw the old set, then the new one: never a mix, never back
        assert mine[0] == before and mine[-1] == after
        switched = mine.index(after)
        assert all(v == before for v in mine[:switched])
        assert all(v == after for v in mine[switched:])


async def test_an_execution_only_edit_goes_live_at_once(world: World) -> None:
    await built(world)
    before = await world.versions()
    tasks = world.sql("SELECT count(*) FROM tasks")
    dep = await world.dags.deploy(None, ORG, edited(mid={"timeout": 30, "max_attempts": 2}))
    assert (dep.version, dep.staged_version, dep.rebuild) == (2, None, [])
    assert world.sql("SELECT count(*) FROM tasks") == tasks
    assert await world.versions() == before
    assert world.sql("SELECT count(*) FROM dag_rematerializations") == [(0,)]


async def test_a_rollback_abandons_the_staging(world: World) -> None:
    await built(world)
    before = await world.versions()
    await world.dags.deploy(None, ORG, edited(mid={"config": {"rule": 2}}))
    out = await world.runs.trigger(None, ORG, "flow", "src", run_id="r2")
    await run_task(world, out["task_id"], dataset="raw", ranges=[(20, 30)])  # held for mid
    rolled = await world.control.rollback(None, ORG, "flow")
    assert (rolled.abandoned, rolled.from_version, rolled.version) == (True, 2, 1)
    assert rolled.canceled == {"queued": 2}
    assert world.tasks("mid", 2, "queued") == []
    assert await world.versions() == before
    assert world.sql("SELECT state FROM dag_rematerializations") == [("abandoned",)]
    # the held event goes to the live version's mid, once
    await world.runs.fan_out_once()
    await world.runs.fan_out_once()
    assert [range_of(world, t) for t in world.tasks("mid", 1, "queued")] == [(20, 30)]
    assert await world.remat.cutover_once() == []


async def test_a_rebuilt_source_reruns_its_runs_with_the_new_config(world: World) -> None:
    await built(world)
    dep = await world.dags.deploy(None, ORG, edited(src={"config": {"chain": "b"}}))
    assert dep.rebuild == ["down", "mid", "side", "src"]
    ((payload, key),) = world.sql(
        "SELECT payload, idempotency_key FROM tasks WHERE dag_job = 'src' AND dag_version = 2"
    )
    assert (payload, key) == ({"chain": "b"}, "flow:src:r1@2")
    # a trigger of the rebuilt source runs in the staged version
    out = await world.runs.trigger(None, ORG, "flow", "src", run_id="r3", payload={"n": 1})
    assert out["version"] == 2


def test_rerun_payload_keeps_what_a_run_added() -> None:
    old = {"chain": "a", "n": 5, "scheduled_time": "t"}
    assert rerun_payload(old, {"chain": "a", "n": 1}, {"chain": "b", "n": 1}) == {
        "chain": "b",
        "n": 5,
        "scheduled_time": "t",
    }


async def test_staged_tasks_read_and_write_the_staged_versions(world: World) -> None:
    await built(world)
    before = await world.versions()
    await world.dags.deploy(None, ORG, edited(mid={"config": {"rule": 2}}))
    await run_all(world, "mid", 2, "mid_ds")
    staged_mid = world.sql(
        "SELECT p.dataset_version::text FROM dag_rematerializations m "
        "JOIN dag_pointers p ON p.dag_id = m.dag_id AND p.generation = m.generation "
        "JOIN datasets d ON d.dataset_uuid = p.dataset_uuid WHERE d.name = 'mid_ds'"
    )[0][0]
    # a staged down task reads mid_ds through the staged pointer set: the rebuilt rows
    (task_id,) = world.tasks("down", 2, "queued")[:1]
    c = await world.d.claim(task_id)
    claims = await world.d.authorize(c.capability_token, c.task_id, c.attempt)
    res = await world.ds.resolve_for_task(claims, ["mid_ds"], pin_ttl_s=0)
    assert res.datasets[0].dataset_version == staged_mid != before["mid_ds"]
    # what mid's rebuild committed is in the staged version only
    assert world.sql(
        "SELECT count(*) FROM dataset_partitions WHERE dataset_version = %s", [staged_mid]
    ) == [(2,)]
    assert world.sql(
        "SELECT count(*) FROM dataset_partitions WHERE dataset_version = %s AND task_id IN "
        "(SELECT task_id FROM tasks WHERE dag_version = 2)",
        [before["mid_ds"]],
    ) == [(0,)]


async def test_a_dataset_two_rebuilt_jobs_publish_gets_one_staged_version(world: World) -> None:
    """A multi_writer dataset published by two jobs: a deploy rebuilding both stages one new
    version of it in the staged pointer set (the publish list names it twice)."""
    out = {
        "storage": "postgres_table",
        "update_strategy": "append",
        "buffered": True,
        "multi_writer": True,
        "unique_key": ["k"],
        "schema": {"k": "string"},
    }
    manual = [{"type": "manual"}]
    spec: dict[str, Any] = {
        "name": "writers",
        "jobs": {
            "a": {"operator": "noop", "config": {"n": 1}, "triggers": manual, "outputs": [out]},
            "b": {"operator": "noop", "config": {"n": 1}, "triggers": manual, "outputs": [out]},
        },
        "publish": [
            {"job": "a", "output": 0, "dataset": "mw"},
            {"job": "b", "output": 0, "dataset": "mw"},
        ],
    }
    first = await world.dags.deploy(None, ORG, spec)
    assert first.created
    changed = copy.deepcopy(spec)
    for job in ("a", "b"):
        changed["jobs"][job]["config"] = {"n": 2}
    dep = await world.dags.deploy(None, ORG, changed)
    assert dep.staged_version == 2 and dep.rebuild == ["a", "b"]
    staged = world.sql(
        "SELECT d.name, count(*) FROM dag_rematerializations m "
        "JOIN dag_pointers p ON p.dag_id = m.dag_id AND p.generation = m.generation "
        "JOIN datasets d ON d.dataset_uuid = p.dataset_uuid GROUP BY d.name"
    )
    assert staged == [("mw", 1)]


async def test_a_staged_version_is_not_purged_while_its_staging_builds(world: World) -> None:
    await built(world)
    await world.dags.deploy(None, ORG, edited(mid={"config": {"rule": 2}}))
    ((staged,),) = world.sql(
        "SELECT p.dataset_version::text FROM dag_rematerializations m "
        "JOIN dag_pointers p ON p.dag_id = m.dag_id AND p.generation = m.generation "
        "JOIN datasets d ON d.dataset_uuid = p.dataset_uuid WHERE d.name = 'mid_ds'"
    )
    assert staged != (await world.versions())["mid_ds"]  # not the live one
    admin = await world.ds.user_caller(ORG, "ada")
    with pytest.raises(errors.Conflict, match="staging"):
        await world.ds.purge(admin, ORG, "mid_ds", staged)
    assert world.sql("SELECT state FROM dataset_versions WHERE dataset_version = %s", [staged]) != [
        ("purged",)
    ]
    # abandoned by a rollback, the staged version is no longer in any set: it may be purged
    await world.control.rollback(None, ORG, "flow")
    await world.ds.purge(admin, ORG, "mid_ds", staged)
    assert world.sql("SELECT state FROM dataset_versions WHERE dataset_version = %s", [staged]) == [
        ("purged",)
    ]
