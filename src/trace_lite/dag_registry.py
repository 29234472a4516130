"""A DAG version's ``publish`` list in the dataset registry. Used by a deploy that goes live at
once (``trace_lite.dags``), by a staging and its cutover (``trace_lite.dag_remat``: a staging
registers only new names, so the live version's datasets keep their producer metadata until the
cutover) and by a rollback (``trace_lite.dag_control``: the restored version's list).

Each entry is a dataset the DAG **owns** (``datasets.dag_id``: the first DAG that registered the
name; its pointer set holds the dataset's versions), or, for a buffered ``multi_writer`` dataset
another DAG owns, a **writer** row (``dataset_writers``, ADR 0037): the DAG's tasks may then
publish batches into it, and they land in the version the owner's active pointer set names.
What a DAG may publish is the kernel's rule (``trace_core.dag.registry_problem``), which deploy's
validation applies first (422 with every problem); here it is applied again to the facts read
under the registry rows' locks, so a deploy racing another one refuses with ``Conflict``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import attrs
import psycopg
from psycopg.types.json import Jsonb

from trace_core import errors
from trace_core.dag import Dag, DatasetFacts, Storage, parse, registry_problem
from trace_lite import sqlfile
from trace_lite.pg import fetch_as

Q = sqlfile.load("dag_registry.sql")
VQ = sqlfile.load("dags.sql")


@attrs.frozen
class _NameRow:
    name: str


@attrs.frozen
class VersionRow:
    """A stored DAG version (``dags.sql`` ``version_spec``): its spec as text."""

    version: int
    digest: str
    spec: str
    created_by: str
    created_at: datetime


@attrs.frozen
class _FactRow:
    name: str
    dataset_uuid: str
    producer_dag: str
    multi_writer: bool
    schema: dict[str, Any]
    unique_key: list[str]
    writer_dags: list[str]

    def facts(self) -> DatasetFacts:
        return DatasetFacts(
            self.name,
            self.producer_dag,
            self.multi_writer,
            self.schema or None,
            tuple(self.unique_key),
            frozenset(self.writer_dags),
        )


def storage_kind(storage: Storage, buffered: bool) -> str:
    """The registry's ``storage_kind`` of an output."""
    if storage is Storage.OBJECT_STORE:
        return "parquet"
    return "buffered_postgres" if buffered else "postgres"


async def _fact_rows(
    cur: psycopg.AsyncCursor[Any], org_id: str, names: Sequence[str] | None
) -> list[_FactRow]:
    params = {"org_id": org_id, "names": list(names) if names is not None else None}
    return await fetch_as(cur, _FactRow, Q["registry_facts"], params)


async def registry_facts(cur: psycopg.AsyncCursor[Any], org_id: str) -> dict[str, DatasetFacts]:
    """What validation needs of every dataset of the org (``trace_core.dag.validate``'s
    ``datasets``): owner, multi-writer, schema, unique_key, the other DAGs writing it."""
    return {r.name: r.facts() for r in await _fact_rows(cur, org_id, None)}


async def register_published(
    cur: psycopg.AsyncCursor[Any], org_id: str, dag_id: str, dag: Dag, *, new_only: bool = False
) -> None:
    """Register each ``publish`` entry of ``dag`` (DAG ``dag_id``): a new name or one it owns as
    a dataset it owns (moved to its new job/output, schema and strategy), a multi_writer
    dataset another DAG owns as a writer row; and drop its writer rows for datasets it no longer
    publishes. With ``new_only`` (a staging), only new names and new writer rows are added.
    Raises ``Conflict`` (field: the entry's path) for an entry ``registry_problem`` refuses
    under the registry rows' locks, or a name another DAG registered meanwhile."""
    rows: dict[str, dict[str, Any]] = {}
    entries: dict[str, int] = {}  # name -> index of its (last) publish entry
    for i, pub in enumerate(dag.publish):  # a name published twice (multi-writer): the last
        out = dag.jobs[pub.job].outputs[pub.output]
        entries[pub.dataset] = i
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
    names = sorted(rows)
    await cur.execute(Q["lock_registered"], {"org_id": org_id, "names": names})
    registered = {r.name: r for r in await _fact_rows(cur, org_id, names)}
    for i, pub in enumerate(dag.publish):
        reg = registered.get(pub.dataset)
        out = dag.jobs[pub.job].outputs[pub.output]
        problem = registry_problem(dag.name, i, pub, out, reg.facts() if reg else None)
        if problem is not None:
            raise errors.Conflict(problem.message, field=problem.path)
    owned = [r for n, r in rows.items() if n not in registered or _owns(registered[n], dag)]
    written = [
        {"dataset_uuid": registered[n].dataset_uuid, "job": r["job"], "output": r["output"]}
        for n, r in rows.items()
        if n in registered and not _owns(registered[n], dag)
    ]
    if owned:
        params = {
            "org_id": org_id,
            "dag_id": dag_id,
            "rows": Jsonb(owned),
            "refresh": not new_only,
        }
        done = {r.name for r in await fetch_as(cur, _NameRow, Q["register_owned"], params)}
        for row in owned:
            if row["name"] not in done:  # another DAG registered it since the lock was taken
                raise errors.Conflict(
                    f"dataset {row['name']!r} is produced by another DAG",
                    field=f"publish[{entries[row['name']]}].dataset",
                )
    params = {"dag_id": dag_id, "rows": Jsonb(written), "refresh": not new_only}
    await cur.execute(Q["sync_writers"], params)


async def register_version(
    cur: psycopg.AsyncCursor[Any], org_id: str, dag_id: str, version: int
) -> None:
    """``register_published`` for the spec of version ``version`` of DAG ``dag_id`` (a cutover
    making it live, a rollback restoring it)."""
    params = {"dag_id": dag_id, "version": version}
    (row,) = await fetch_as(cur, VersionRow, VQ["version_spec"], params)
    await register_published(cur, org_id, dag_id, parse(json.loads(row.spec)))


def _owns(reg: _FactRow, dag: Dag) -> bool:
    return reg.producer_dag == dag.name


__all__ = [
    "VersionRow",
    "register_published",
    "register_version",
    "registry_facts",
    "storage_kind",
]
