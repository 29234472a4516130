"""A DAG version's ``publish`` list in the dataset registry: each entry a dataset produced by
the DAG's job output. Used by a deploy that goes live at once (``trace_lite.dags``) and by a
staging and its cutover (``trace_lite.dag_remat``: a staging registers only new names, so
the live version's datasets keep their producer metadata until the cutover)."""

from __future__ import annotations

from typing import Any

import attrs
import psycopg
from psycopg.types.json import Jsonb

from trace_core import errors
from trace_core.dag import Dag, Storage
from trace_lite import sqlfile
from trace_lite.pg import fetch_as

Q = sqlfile.load("dags.sql")


@attrs.frozen
class _UuidRow:
    dataset_uuid: str


def storage_kind(storage: Storage, buffered: bool) -> str:
    """The registry's ``storage_kind`` of an output."""
    if storage is Storage.OBJECT_STORE:
        return "parquet"
    return "buffered_postgres" if buffered else "postgres"


async def register_published(
    cur: psycopg.AsyncCursor[Any], org_id: str, dag_id: str, dag: Dag, *, new_only: bool = False
) -> None:
    """Register each ``publish`` entry of ``dag`` as a dataset of DAG ``dag_id`` (or move an
    existing one of this DAG to its new job/output, schema and strategy); with ``new_only``,
    names the DAG already has are left as they are. Raises ``Conflict`` for a name another DAG
    produces."""
    for pub in dag.publish:
        out = dag.jobs[pub.job].outputs[pub.output]
        rows = await fetch_as(
            cur,
            _UuidRow,
            Q["insert_published" if new_only else "upsert_published"],
            {
                "org_id": org_id,
                "name": pub.dataset,
                "dag_id": dag_id,
                "job": pub.job,
                "output": pub.output,
                "storage_kind": storage_kind(out.storage, out.buffered),
                "schema": Jsonb(dict(out.schema)),
                "update_strategy": out.update_strategy.value,
                "unique_key": list(out.unique_key),
                "multi_writer": out.multi_writer,
            },
        )
        if not rows:
            raise errors.Conflict(
                f"dataset {pub.dataset!r} is produced by another DAG", field="publish"
            )


__all__ = ["register_published", "storage_kind"]
