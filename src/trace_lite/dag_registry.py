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
class _NameRow:
    name: str


def storage_kind(storage: Storage, buffered: bool) -> str:
    """The registry's ``storage_kind`` of an output."""
    if storage is Storage.OBJECT_STORE:
        return "parquet"
    return "buffered_postgres" if buffered else "postgres"


async def register_published(
    cur: psycopg.AsyncCursor[Any], org_id: str, dag_id: str, dag: Dag, *, new_only: bool = False
) -> None:
    """Register each ``publish`` entry of ``dag`` as a dataset of DAG ``dag_id`` (or move an
    existing one of this DAG to its new job/output, schema and strategy), in one statement;
    with ``new_only``, names the DAG already has are left as they are. Raises ``Conflict`` for
    a name another DAG produces."""
    rows: dict[str, dict[str, Any]] = {}
    for pub in dag.publish:  # a name published twice (multi-writer outputs): the last one
        out = dag.jobs[pub.job].outputs[pub.output]
        rows[pub.dataset] = {
            "name": pub.dataset,
            "job": pub.job,
            "output": pub.output,
            "storage_kind": storage_kind(out.storage, out.buffered),
            "schema": dict(out.schema),
            "update_strategy": out.update_strategy.value,
            "unique_key": list(out.unique_key),
            "multi_writer": out.multi_writer,
        }
    if not rows:
        return
    params = {"org_id": org_id, "dag_id": dag_id, "rows": Jsonb(list(rows.values()))}
    query = Q["insert_published" if new_only else "upsert_published"]
    done = {r.name for r in await fetch_as(cur, _NameRow, query, params)}
    for name in rows:
        if name not in done:
            raise errors.Conflict(f"dataset {name!r} is produced by another DAG", field="publish")


__all__ = ["register_published", "storage_kind"]
