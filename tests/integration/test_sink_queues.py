"""Buffer queues are created when the DAG declaring their dataset is deployed (Postgres queue
and SQS on the moto server), and a redeploy's schema change is checked against the buffered
dataset's registered schema: compatible changes deploy, incompatible ones are refused with every
problem's path and nothing written. Real Postgres."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator
from typing import Any

import pytest

from pg_sql import sql
from trace_aws._boto import client
from trace_aws.sqs_queue import SqsQueue
from trace_core import errors
from trace_lite.buffer_forwarder import queue_name
from trace_lite.buffer_queues import QueueProvisioner, buffer_queue, create_nothing
from trace_lite.dag_remat import DagRemat
from trace_lite.dags import Dags
from trace_lite.dispatcher import open_pool
from trace_lite.sink import load_dataset
from trace_servers.dag_cli import builtin_operators

ORG = "acme"


def dag_doc(schema: dict[str, str] | None = None, unique_key: list[str] | None = None) -> Any:
    return {
        "name": "alerts",
        "jobs": {
            "detect": {
                "operator": "emit_events",
                "triggers": [{"type": "manual"}],
                "outputs": [
                    {
                        "storage": "postgres_table",
                        "update_strategy": "append",
                        "buffered": True,
                        "unique_key": unique_key or ["tx_hash"],
                        "schema": schema or {"tx_hash": "bytes", "n": "int32", "v": "uint64"},
                    },
                    {
                        "storage": "postgres_table",
                        "update_strategy": "append",
                        "unique_key": ["k"],
                        "schema": {"k": "string"},
                    },
                ],
            }
        },
        "publish": [
            {"job": "detect", "output": 0, "dataset": "transfers"},
            {"job": "detect", "output": 1, "dataset": "plain"},
        ],
    }


@pytest.fixture
async def pool(db_url: str) -> AsyncIterator[Any]:
    p = await open_pool(db_url, min_size=1, max_size=4)
    try:
        yield p
    finally:
        await p.close()


async def test_deploy_records_the_queue_of_each_buffered_dataset_in_its_transaction(
    pool: Any, db_url: str
) -> None:
    dags = Dags(pool, operators=builtin_operators())
    await dags.deploy(None, ORG, dag_doc(), dry_run=True)
    assert sql(db_url, "SELECT count(*) FROM buffer_queues") == [(0,)]  # a dry run: nothing
    await dags.deploy(None, ORG, dag_doc())
    ds = await load_dataset(pool, ORG, "transfers")
    # only the buffered dataset has a queue; its name is the forwarder's and the sink's
    rows = sql(db_url, "SELECT dataset_uuid::text, queue, provisioned_at FROM buffer_queues")
    assert rows == [(ds.dataset_uuid, queue_name(ds.dataset_uuid), None)]
    provisioner = QueueProvisioner(pool, create_nothing)
    assert await provisioner.provision_once() == 1
    assert await provisioner.provision_once() == 0
    row = await buffer_queue(pool, ds.dataset_uuid)
    assert row is not None and row.provisioned and row.last_error is None
    # a redeploy keeps the queue (no second row, still provisioned)
    await dags.deploy(None, ORG, dag_doc({"tx_hash": "bytes", "n": "int64", "v": "uint64"}))
    assert sql(db_url, "SELECT count(*), count(provisioned_at) FROM buffer_queues") == [(1, 1)]


async def test_sqs_queue_and_its_dlq_are_created_at_deploy_not_by_a_sink(
    pool: Any, db_url: str, moto_server: Any
) -> None:
    await Dags(pool, operators=builtin_operators()).deploy(None, ORG, dag_doc())
    ds = await load_dataset(pool, ORG, "transfers")
    name = queue_name(ds.dataset_uuid)
    with pytest.raises(errors.NotFound):
        SqsQueue.lookup(name, endpoint_url=moto_server.url)  # a sink never creates it

    async def create_on_moto(queue: str) -> None:
        q = await asyncio.to_thread(SqsQueue.create, queue, endpoint_url=moto_server.url)
        await q.close()

    # SQS unreachable first: the queue stays recorded, with the reason, and is retried
    async def unreachable(queue: str) -> None:
        raise errors.Unavailable("create queue: EndpointConnectionError")

    assert await QueueProvisioner(pool, unreachable).provision_once() == 0
    ((tries, error, provisioned),) = sql(
        db_url, "SELECT tries, last_error, provisioned_at FROM buffer_queues"
    )
    assert (tries, provisioned) == (1, None) and "EndpointConnectionError" in error
    sql(db_url, "UPDATE buffer_queues SET available_at = now()")
    assert await QueueProvisioner(pool, create_on_moto).provision_once() == 1
    sqs = client("sqs", endpoint_url=moto_server.url)
    url = sqs.get_queue_url(QueueName=name)["QueueUrl"]
    dlq = sqs.get_queue_url(QueueName=f"{name}-dlq")["QueueUrl"]
    policy = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["RedrivePolicy"])
    assert f"{name}-dlq" in policy["Attributes"]["RedrivePolicy"]
    queue = SqsQueue.lookup(name, endpoint_url=moto_server.url)
    try:
        assert queue.queue_url == url
        assert (await queue.stats()).dead == 0
        assert await queue._dlq() == dlq
    finally:
        await queue.close()


def refusal(exc: pytest.ExceptionInfo[errors.ValidationFailed]) -> list[tuple[str, str]]:
    assert exc.value.code == "validation_failed"
    problems = exc.value.details["problems"]
    return [(p["path"], p["message"]) for p in problems]


@pytest.mark.parametrize("dry_run", [False, True])
async def test_an_incompatible_schema_change_is_refused_with_paths_and_nothing_written(
    pool: Any, db_url: str, dry_run: bool
) -> None:
    dags = Dags(pool, operators=builtin_operators())
    await dags.deploy(None, ORG, dag_doc())
    before = sql(db_url, "SELECT version, digest FROM dag_versions ORDER BY version")
    registry = sql(db_url, "SELECT name, schema, unique_key FROM datasets ORDER BY name")
    narrowed = {"tx_hash": "bytes", "n": "int32", "v": "int64"}  # uint64 -> int64 narrows
    with pytest.raises(errors.ValidationFailed) as exc:
        await dags.deploy(None, ORG, dag_doc(narrowed), dry_run=dry_run)
    ((path, message),) = refusal(exc)
    assert exc.value.field == path == "jobs.detect.outputs[0].schema.v"
    assert "cannot change from uint64 to int64" in message and "uint256" in message
    # a column removed and the unique_key changed: every problem, each with its path
    with pytest.raises(errors.ValidationFailed) as exc:
        await dags.deploy(
            None,
            ORG,
            dag_doc({"tx_hash": "bytes", "n": "int32"}, ["tx_hash", "n"]),
            dry_run=dry_run,
        )
    assert [p for p, _ in refusal(exc)] == [
        "jobs.detect.outputs[0].schema",
        "jobs.detect.outputs[0].unique_key",
    ]
    assert "column 'v'" in refusal(exc)[0][1]
    assert sql(db_url, "SELECT version, digest FROM dag_versions ORDER BY version") == before
    assert sql(db_url, "SELECT name, schema, unique_key FROM datasets ORDER BY name") == registry
    # the non-buffered dataset is not held to it (its table is replaced per version)
    doc = dag_doc()
    other = copy.deepcopy(doc)
    other["jobs"]["detect"]["outputs"][1]["schema"] = {"k": "int64"}
    deployed = await dags.deploy(None, ORG, other, dry_run=dry_run)
    assert deployed.dry_run == dry_run


async def test_a_compatible_schema_change_deploys(pool: Any, db_url: str) -> None:
    dags = Dags(pool, operators=builtin_operators())
    await dags.deploy(None, ORG, dag_doc())
    wider = {"tx_hash": "bytes", "n": "int64", "v": "uint256", "memo": "string"}
    deployed = await dags.deploy(None, ORG, dag_doc(wider))
    assert deployed.created and deployed.staged_version == 2  # a rebuild (trace_lite.dag_remat)
    await DagRemat(pool).cutover_once()
    ((schema,),) = sql(db_url, "SELECT schema FROM datasets WHERE name = 'transfers'")
    assert schema == wider
