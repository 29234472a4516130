"""A multi_writer dataset written by several DAGs of one org (ADR 0037), on real Postgres: the
first DAG to publish ``alert_events`` owns it, a second DAG declaring the same buffered
multi_writer output (same schema and unique_key) deploys as a registered writer; validation
with the registry and deploy agree on every case; the writers' tasks publish batches that the
sink commits into the owner's active version; a task of a DAG that neither owns nor writes it
is refused at publish and by the sink; a DAG reading ``from: {dataset: alert_events}`` gets one
task per committed batch of each writer."""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from aiohttp.test_utils import TestClient, TestServer

from pg_sql import sql
from trace_core import dag, errors, wire
from trace_core.lifecycle import RetryPolicy
from trace_core.testing import MemoryObjectStore, MemoryQueue, MemorySigner
from trace_lite.buffer_forwarder import BufferForwarder, queue_name, topic
from trace_lite.dag_control import DagControl
from trace_lite.dag_registry import register_published, registry_facts
from trace_lite.dag_remat import DagRemat
from trace_lite.dag_runs import DagRuns
from trace_lite.dags import Dags
from trace_lite.datasets import Datasets, table_name
from trace_lite.dispatcher import Dispatcher, open_pool
from trace_lite.pg import transaction
from trace_lite.pg_queue import PgQueue
from trace_lite.sink import EVENT_TYPE, Sink, load_dataset
from trace_lite.users import LocalUserIssuer, UserAuthenticator
from trace_servers.app import make_app
from trace_servers.dag_cli import builtin_operators

ORG = "acme"
DATASET = "alert_events"
SCHEMA = {"alert_key": "string", "severity": "string", "value": "int64"}


def detector(name: str, *, multi_writer: bool = True, **output: Any) -> dict[str, Any]:
    """DAG ``name``: a manual job ``detect`` whose buffered append output publishes
    ``alert_events`` (``output`` overrides fields of it)."""
    out: dict[str, Any] = {
        "storage": "postgres_table",
        "update_strategy": "append",
        "buffered": True,
        "unique_key": ["alert_key"],
        "schema": dict(SCHEMA),
    }
    if multi_writer:
        out["multi_writer"] = True
    out.update(output)
    return {
        "name": name,
        "jobs": {
            "detect": {
                "operator": "emit_events",
                "triggers": [{"type": "manual"}],
                "outputs": [out],
            }
        },
        "publish": [{"job": "detect", "output": 0, "dataset": DATASET}],
    }


def without_publish(doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` publishing nothing (its job's output stays)."""
    return {**copy.deepcopy(doc), "publish": []}


@attrs.define
class Env:
    db_url: str
    data_url: str
    pools: list[Any]
    dispatcher: Dispatcher
    dags: Dags
    runs: DagRuns
    store: MemoryObjectStore

    def writers(self) -> list[tuple[Any, ...]]:
        return sql(
            self.db_url,
            "SELECT g.name, w.job_name, w.output_index FROM dataset_writers w "
            "JOIN dags g USING (dag_id) ORDER BY 1",
        )

    def owner(self) -> list[tuple[Any, ...]]:
        return sql(
            self.db_url,
            "SELECT g.name, d.multi_writer FROM datasets d JOIN dags g USING (dag_id) "
            "WHERE d.name = %s",
            (DATASET,),
        )

    async def facts(self) -> dict[str, dag.DatasetFacts]:
        async with transaction(self.pools[0]) as cur:
            (org_id,) = sql(self.db_url, "SELECT org_id FROM orgs WHERE name = %s", (ORG,))[0]
            return await registry_facts(cur, str(org_id))

    async def fence(self, dag_name: str) -> dict[str, Any]:
        """A claimed task of job ``detect`` of DAG ``dag_name``, as a fence."""
        started = await self.runs.trigger(None, ORG, dag_name, "detect")
        claim = await self.dispatcher.claim(started["task_id"])
        return {
            "task_id": claim.task_id,
            "attempt": claim.attempt,
            "lease_token": claim.lease_token,
        }

    async def publish(self, fence: dict[str, Any], key: str, rows: list[dict[str, Any]]) -> None:
        data = b"".join(json.dumps(r).encode() + b"\n" for r in rows)
        prefix = (await self.dispatcher.fetch(fence["task_id"])).staging_prefix
        object_key = f"{prefix}buffer/{DATASET}/{key}.jsonl"
        info = await self.store.put(object_key, data)
        batch = wire.BufferBatchIn(key, DATASET, object_key, len(rows), info.size, info.sha256)
        await self.dispatcher.publish_buffer(wire.BufferPublishRequest(**fence, batch=batch))

    async def sink(self) -> tuple[Sink, PgQueue]:
        """Forward the announced batches to the dataset's queue; a sink draining it."""
        ds = await load_dataset(self.pools[0], ORG, DATASET)
        queue = PgQueue(self.pools[0], queue_name(ds.dataset_uuid), max_receives=5)
        await BufferForwarder(self.pools[0], lambda _: queue, topics=[topic(DATASET)]).drain()
        sink = Sink(
            state_pool=self.pools[0],
            data_pool=self.pools[1],
            object_store=self.store,
            queue=queue,
            org=ORG,
            dataset=DATASET,
            visibility_timeout_s=30.0,
        )
        while await sink.process_once():
            pass
        return sink, queue


@pytest.fixture
async def env(db_url: str, data_db_url: str) -> AsyncIterator[Env]:
    state = await open_pool(db_url, min_size=1, max_size=6)
    data = await open_pool(data_db_url, min_size=1, max_size=4)
    store = MemoryObjectStore()
    dispatcher = Dispatcher(
        state,
        signer=MemorySigner(),
        queue=MemoryQueue("tasks"),
        object_store=store,
        retry=RetryPolicy(max_attempts=3, base_s=0.0),
    )
    await Datasets(state, object_store=store).set_member(None, ORG, "alice", ["admin"])
    dags = Dags(state, operators=builtin_operators())
    try:
        yield Env(db_url, data_db_url, [state, data], dispatcher, dags, DagRuns(state), store)
    finally:
        await state.close()
        await data.close()


def alert(key: str, value: int = 1) -> dict[str, Any]:
    return {"alert_key": key, "severity": "high", "value": value}


# --- registry: deploy and validation ---------------------------------------------------------


async def test_a_second_multi_writer_dag_deploys_as_a_writer_and_drops_out_when_it_stops(
    env: Env,
) -> None:
    """``whales`` owns ``alert_events``; ``bursts`` declaring the same multi_writer output is
    registered as its writer (the dataset stays ``whales``'s, with no version in ``bursts``'s
    pointer set); a version of ``bursts`` that no longer publishes it drops the writer row."""
    await env.dags.deploy(None, ORG, detector("whales"))
    assert dag.validate(detector("bursts"), datasets=await env.facts()) == []
    deployed = await env.dags.deploy(None, ORG, detector("bursts"))
    assert (deployed.version, deployed.created) == (1, True)
    assert env.owner() == [("whales", True)]
    assert env.writers() == [("bursts", "detect", 0)]
    facts = (await env.facts())[DATASET]
    assert (facts.producer_dag, facts.writer_dags) == ("whales", frozenset({"bursts"}))
    assert facts.unique_key == ("alert_key",)
    pointed = sql(
        env.db_url,
        "SELECT g.name FROM dag_pointers p JOIN dags g USING (dag_id) "
        "JOIN datasets d USING (dataset_uuid) WHERE d.name = %s",
        (DATASET,),
    )
    assert pointed == [("whales",)]
    await env.dags.deploy(None, ORG, detector("bursts"))  # the same file again: no change
    assert env.writers() == [("bursts", "detect", 0)]
    await env.dags.deploy(None, ORG, without_publish(detector("bursts")))
    assert env.writers() == []
    assert env.owner() == [("whales", True)]


#: DAG ``bursts`` publishing ``alert_events`` that DAG ``whales`` (multi_writer, ``SCHEMA``,
#: unique on ``alert_key``) owns: (case, document, the refused path or None when accepted).
CASES = [
    ("writer not multi_writer", detector("bursts", multi_writer=False), "publish[0].dataset"),
    (
        "another column type",
        detector("bursts", schema={**SCHEMA, "value": "string"}),
        "jobs.detect.outputs[0].schema",
    ),
    (
        "one more column",
        detector("bursts", schema={**SCHEMA, "extra": "string"}),
        "jobs.detect.outputs[0].schema",
    ),
    (
        "another unique_key",
        detector("bursts", unique_key=["alert_key", "severity"]),
        "jobs.detect.outputs[0].unique_key",
    ),
    ("the same output", detector("bursts"), None),
]


async def test_validation_with_the_registry_and_deploy_agree_on_every_case(env: Env) -> None:
    """Each case: ``validate`` with the registry's facts refuses exactly what deploy refuses
    (422, the same path first, nothing written) and accepts what deploy accepts."""
    await env.dags.deploy(None, ORG, detector("whales"))
    for case, doc, path in CASES:
        problems = dag.validate(doc, datasets=await env.facts())
        assert [p.path for p in problems] == ([path] if path else []), case
        if path is None:
            await env.dags.deploy(None, ORG, doc)
            continue
        with pytest.raises(errors.ValidationFailed) as info:
            await env.dags.deploy(None, ORG, doc)
        assert info.value.field == path, case
        assert sql(env.db_url, "SELECT count(*) FROM dags WHERE name = 'bursts'") == [(0,)]
        assert env.writers() == [], case
    assert env.writers() == [("bursts", "detect", 0)]


async def test_a_dataset_that_is_not_multi_writer_has_one_producing_dag(env: Env) -> None:
    """``whales`` owns ``alert_events`` without multi_writer: ``bursts`` is refused whether or
    not it declares multi_writer, by validation (422) and, past it, by the registry under its
    locks (409, nothing written)."""
    await env.dags.deploy(None, ORG, detector("whales", multi_writer=False))
    for multi in (True, False):
        doc = detector("bursts", multi_writer=multi)
        (problem,) = dag.validate(doc, datasets=await env.facts())
        assert problem.path == "publish[0].dataset"
        assert "produced by DAG 'whales'" in problem.message
        with pytest.raises(errors.ValidationFailed) as info:
            await env.dags.deploy(None, ORG, doc)
        assert info.value.field == "publish[0].dataset"
    # the second layer: the registry refuses it in the deploy's transaction (a deploy that
    # validated against facts another deploy has since changed)
    await env.dags.deploy(None, ORG, without_publish(detector("bursts")))
    (bursts_id,) = sql(env.db_url, "SELECT dag_id::text FROM dags WHERE name = 'bursts'")[0]
    (org_id,) = sql(env.db_url, "SELECT org_id::text FROM orgs WHERE name = %s", (ORG,))[0]
    with pytest.raises(errors.Conflict) as conflict:
        async with transaction(env.pools[0]) as cur:
            await register_published(cur, org_id, bursts_id, dag.parse(detector("bursts")))
    assert conflict.value.field == "publish[0].dataset"
    assert "produced by DAG 'whales'" in conflict.value.message
    assert env.writers() == []
    assert env.owner() == [("whales", False)]


async def test_the_owner_keeps_the_dataset_multi_writer_and_its_shape_while_others_write_it(
    env: Env,
) -> None:
    """With ``bursts`` writing ``whales``'s dataset, a ``whales`` version that drops
    multi_writer or changes the schema is refused (validation and registry agree); once
    ``bursts`` stops publishing it, the same versions deploy."""
    await env.dags.deploy(None, ORG, detector("whales"))
    await env.dags.deploy(None, ORG, detector("bursts"))
    narrowed = detector("whales", multi_writer=False)
    widened = detector("whales", schema={**SCHEMA, "note": "string"})
    for doc, path in (
        (narrowed, "jobs.detect.outputs[0].multi_writer"),
        (widened, "jobs.detect.outputs[0].schema"),
    ):
        (problem,) = dag.validate(doc, datasets=await env.facts())
        assert problem.path == path
        assert "also written by DAG(s) 'bursts'" in problem.message
        with pytest.raises(errors.ValidationFailed) as info:
            await env.dags.deploy(None, ORG, doc)
        assert info.value.field == path
    assert env.owner() == [("whales", True)]
    await env.dags.deploy(None, ORG, without_publish(detector("bursts")))
    assert dag.validate(widened, datasets=await env.facts()) == []
    await env.dags.deploy(None, ORG, widened)
    await DagRemat(env.pools[0]).cutover_once()  # a schema change rebuilds: its cutover
    assert sql(env.db_url, "SELECT schema ? 'note' FROM datasets WHERE name = %s", (DATASET,)) == [
        (True,)
    ]


async def test_concurrent_deploys_of_the_owner_and_two_writers_register_each_once(
    env: Env,
) -> None:
    """The owner's redeploy and two new writers' first deploys at once: each lands (the
    registry rows' locks serialize them), the owner stays the owner, both writers are rows."""
    await env.dags.deploy(None, ORG, detector("whales"))
    again = {**detector("whales"), "description": "edited"}
    done = await asyncio.gather(
        env.dags.deploy(None, ORG, again),
        env.dags.deploy(None, ORG, detector("bursts")),
        env.dags.deploy(None, ORG, detector("apes")),
    )
    assert [d.created for d in done] == [True, True, True]
    assert env.owner() == [("whales", True)]
    assert env.writers() == [("apes", "detect", 0), ("bursts", "detect", 0)]


async def test_deploy_over_http_answers_422_with_the_path_then_201(
    env: Env, tmp_path: Path
) -> None:
    """``POST /v1/orgs/{org}/dags``: a writer whose schema differs is 422 with the output's path
    (nothing written); the same output as the owner's is deployed (201)."""
    await Datasets(env.pools[0], object_store=env.store).set_member(
        None, ORG, "dora", ["dag_deployer"]
    )
    issuer = LocalUserIssuer.init(tmp_path / "keys")
    auth = UserAuthenticator({issuer.key.kid: issuer.key})
    dora = {"Authorization": f"Bearer {issuer.token('dora')}"}
    base = f"/v1/orgs/{ORG}/dags"
    app = make_app(env.dispatcher, platform_token="platform-0123456789abcdef", user_auth=auth)
    async with TestClient(TestServer(app)) as c:
        r = await c.post(base, json={"spec": detector("whales")}, headers=dora)
        assert r.status == 201
        bad = detector("bursts", schema={**SCHEMA, "value": "string"})
        r = await c.post(base, json={"spec": bad}, headers=dora)
        body = await r.json()
        assert (r.status, body["error"]) == (422, "validation_failed")
        assert body["field"] == "jobs.detect.outputs[0].schema"
        assert sql(env.db_url, "SELECT count(*) FROM dags WHERE name = 'bursts'") == [(0,)]
        r = await c.post(base, json={"spec": detector("bursts")}, headers=dora)
        assert r.status == 201
    assert env.writers() == [("bursts", "detect", 0)]


# --- publishing, the sink, readers -----------------------------------------------------------


async def test_writers_batches_land_in_the_owners_active_version_and_others_are_refused(
    env: Env,
) -> None:
    """Tasks of ``whales`` (owner) and ``bursts`` (writer) publish batches, stored by the sink
    in the version ``whales``'s active pointer set names; a task of ``rogue`` (publishes
    nothing) is refused at publish (403, nothing recorded); a batch ``gone`` published while it
    was a writer is dead-lettered by the sink once its new version dropped the dataset."""
    await env.dags.deploy(None, ORG, detector("whales"))
    await env.dags.deploy(None, ORG, detector("bursts"))
    await env.dags.deploy(None, ORG, detector("gone"))
    await env.dags.deploy(None, ORG, without_publish(detector("rogue")))
    fences = {name: await env.fence(name) for name in ("whales", "bursts", "gone", "rogue")}
    await env.publish(fences["whales"], "w1", [alert("w-1"), alert("w-2")])
    await env.publish(fences["bursts"], "b1", [alert("b-1", 7)])
    await env.publish(fences["gone"], "g1", [alert("g-1")])
    with pytest.raises(errors.Forbidden) as info:
        await env.publish(fences["rogue"], "r1", [alert("r-1")])
    assert info.value.field == "batch.dataset"
    recorded = sql(env.db_url, "SELECT batch_key FROM buffer_batches ORDER BY 1")
    assert recorded == [("b1",), ("g1",), ("w1",)]
    await env.dags.deploy(None, ORG, without_publish(detector("gone")))
    sink, queue = await env.sink()
    assert (sink.stats["batches"], sink.stats["dead"]) == (2, 1)
    (dead,) = await queue.dead_letters()
    assert "forbidden" in str(dead.dead_letter_reason)
    version = (await load_dataset(env.pools[0], ORG, DATASET)).dataset_version
    assert version is not None
    (active,) = sql(
        env.db_url,
        "SELECT p.dataset_version::text FROM dag_pointers p "
        "JOIN dags g ON (g.dag_id, g.active_generation) = (p.dag_id, p.generation) "
        "JOIN datasets d USING (dataset_uuid) WHERE g.name = 'whales' AND d.name = %s",
        (DATASET,),
    )[0]
    assert active == version
    rows = sql(
        env.data_url, f"SELECT alert_key, value FROM {table_name(version)} ORDER BY alert_key"
    )
    assert rows == [("b-1", 7), ("w-1", 1), ("w-2", 1)]
    committed = sql(
        env.db_url,
        "SELECT g.name, e.payload->>'dataset_version' FROM task_events e "
        "JOIN tasks t USING (task_id) JOIN dags g ON g.dag_id = t.dag_id "
        "WHERE e.event_type = %s ORDER BY 1",
        (EVENT_TYPE,),
    )
    assert committed == [("bursts", version), ("whales", version)]


async def test_a_reader_of_the_dataset_gets_a_task_per_committed_batch_of_each_writer(
    env: Env,
) -> None:
    """DAG ``readers`` reads ``from: {dataset: alert_events}``: each rows_committed event of
    ``whales`` and of ``bursts`` creates one task of its job; a repeated pass creates none."""
    await env.dags.deploy(None, ORG, detector("whales"))
    await env.dags.deploy(None, ORG, detector("bursts"))
    reader = {
        "name": "readers",
        "jobs": {"route": {"operator": "emit_events", "inputs": [{"from": {"dataset": DATASET}}]}},
    }
    await env.dags.deploy(None, ORG, reader)
    producers = {}
    for name in ("whales", "bursts"):
        fence = await env.fence(name)
        producers[name] = fence["task_id"]
        await env.publish(fence, f"{name}-1", [alert(f"{name}-a")])
        await env.publish(fence, f"{name}-2", [alert(f"{name}-b")])
    await env.sink()
    report = await env.runs.fan_out_once()
    assert (report.events, report.created) == (4, 4)
    assert (await env.runs.fan_out_once()).events == 0
    uuid_ = (await load_dataset(env.pools[0], ORG, DATASET)).dataset_uuid
    tasks = sql(
        env.db_url,
        "SELECT payload->'event'->>'producer_task_id', payload->'event'->>'key' FROM tasks "
        "WHERE dag_job = 'route' ORDER BY 2",
    )
    assert sorted(tasks) == sorted(
        (producers[name], f"sink/{uuid_}/{name}-{n}")
        for name in ("whales", "bursts")
        for n in (1, 2)
    )
    # lineage: every reader task read the version the owner's active pointer set names, the
    # writer's batches too (bursts has no pointer to the dataset)
    version = (await load_dataset(env.pools[0], ORG, DATASET)).dataset_version
    lineage = sql(
        env.db_url,
        "SELECT i.dataset_uuid::text, i.dataset_version::text FROM task_inputs i "
        "JOIN tasks t USING (task_id) WHERE t.dag_job = 'route'",
    )
    assert lineage == [(str(uuid_), version)] * 4


async def test_a_writer_dags_rebuild_stages_nothing_of_the_shared_dataset(env: Env) -> None:
    """A materialization-affecting edit of ``bursts``'s writer job stages a rebuild; the
    staged pointer set of ``bursts`` holds no version of ``alert_events``, and a staged task's
    batch lands in ``whales``'s active version like any other."""
    await env.dags.deploy(None, ORG, detector("whales"))
    await env.dags.deploy(None, ORG, detector("bursts"))
    edited = detector("bursts")
    edited["jobs"]["detect"]["config"] = {"threshold": 2}
    deployed = await env.dags.deploy(None, ORG, edited)
    assert deployed.staged_version == 2
    staged = sql(
        env.db_url,
        "SELECT count(*) FROM dag_pointers p JOIN dag_rematerializations m "
        "ON (m.dag_id, m.generation) = (p.dag_id, p.generation) "
        "JOIN datasets d USING (dataset_uuid) WHERE d.name = %s",
        (DATASET,),
    )
    assert staged == [(0,)]
    fence = await env.fence("bursts")
    (version,) = sql(
        env.db_url, "SELECT dag_version FROM tasks WHERE task_id = %s", (fence["task_id"],)
    )[0]
    assert version == 2  # a task of the staged version
    await env.publish(fence, "staged-1", [alert("s-1")])
    sink, _ = await env.sink()
    assert (sink.stats["batches"], sink.stats["dead"]) == (1, 0)
    active = (await load_dataset(env.pools[0], ORG, DATASET)).dataset_version
    assert active is not None
    assert sql(env.data_url, f"SELECT alert_key FROM {table_name(active)}") == [("s-1",)]


async def test_a_writers_rollback_restores_its_writer_row_and_its_writes(env: Env) -> None:
    """``bursts`` v2 stops publishing ``alert_events`` (its writer row goes); rolling back to
    v1 restores the row in the same transaction, so the restored version's tasks may write the
    dataset again (without it: 403 at publish)."""
    await env.dags.deploy(None, ORG, detector("whales"))
    await env.dags.deploy(None, ORG, detector("bursts"))
    await env.dags.deploy(None, ORG, without_publish(detector("bursts")))
    assert env.writers() == []
    with pytest.raises(errors.Forbidden):
        await env.publish(await env.fence("bursts"), "b0", [alert("b-0")])
    control = DagControl(env.pools[0])
    rolled = await control.rollback(None, ORG, "bursts")
    assert (rolled.from_version, rolled.version) == (2, 1)
    assert env.writers() == [("bursts", "detect", 0)]
    await env.publish(await env.fence("bursts"), "b1", [alert("b-1")])
    assert sql(env.db_url, "SELECT batch_key FROM buffer_batches") == [("b1",)]


async def test_a_rollback_the_registry_refuses_changes_nothing(env: Env) -> None:
    """``bursts`` v1 wrote ``alert_events``; after v2 stopped, ``whales`` (the owner) dropped
    ``multi_writer``: restoring v1 would make bursts a writer of a single-writer dataset, so
    the rollback answers Conflict and leaves v2 active."""
    await env.dags.deploy(None, ORG, detector("whales"))
    await env.dags.deploy(None, ORG, detector("bursts"))
    await env.dags.deploy(None, ORG, without_publish(detector("bursts")))
    staged = await env.dags.deploy(None, ORG, detector("whales", multi_writer=False))
    assert staged.staged_version == 2  # a materialization edit: live at its cutover
    (cut,) = await DagRemat(env.pools[0]).cutover_once()  # nothing to rebuild: ready
    assert cut.version == 2 and env.owner() == [("whales", False)]
    control = DagControl(env.pools[0])
    with pytest.raises(errors.Conflict) as info:
        await control.rollback(None, ORG, "bursts")
    assert info.value.field is not None and info.value.field.startswith("publish[0]")
    assert sql(env.db_url, "SELECT active_version FROM dags WHERE name = 'bursts'") == [(2,)]
    assert env.writers() == []
