"""The tables of buffered Postgres datasets, and how they follow their dataset's schema.

A dataset version's table (``data.dsv_<version hex>`` in the data database,
``trace_lite.datasets.table_name``) is created by the first batch a sink stores into it and
always takes the schema its batches are parsed against:

* **at deploy** (``schema_change_problems``, called by ``trace_lite.dags`` in the deploy's
  transaction, before anything is written): a new schema of a registered buffered dataset is
  checked against the registry's with ``trace_core.sink.schema_evolution``. A column added
  (nullable) or a type widened (``trace_core.sink.WIDENINGS``) is accepted (the deploy then
  rebuilds the dataset into a staged version, ``trace_lite.dag_remat``); a column removed, a
  type changed otherwise or a ``unique_key`` changed refuses the whole deploy with a
  ``Problem`` naming the output's path (``jobs.<job>.outputs[<i>].schema.<column>``);
* **at a batch** (``ensure_table``, in the sink's data transaction, under an advisory lock per
  table so concurrent sinks serialize): the table is created if missing, then each declared
  column missing from it is added (``ADD COLUMN``, nullable) and each column whose Postgres
  type is a widening of the table's is altered (``ALTER COLUMN ... TYPE``). A column whose
  type differs otherwise (changed outside Trace) raises ``ValidationFailed`` and the sink
  dead-letters the batch with that reason; nothing is written.

Old rows keep their values (null in an added column). Every table also has ``_scope`` (each
row's batch scope; added to older tables at their next batch), and a ``replace`` version its
scope owners (``ensure_scopes``: ``data.dsv_<hex>_scopes`` and an index on ``_scope``;
``trace_lite.sink``, "Replace datasets").
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import attrs
import psycopg
from psycopg import sql

from trace_core import errors
from trace_core.dag import Dag, Problem, Storage
from trace_core.sink import WIDENINGS, DatasetSchema, schema_evolution
from trace_lite import sqlfile
from trace_lite.datasets import DATA_SCHEMA, table_name
from trace_lite.pg import fetch_as

Q = sqlfile.load("sink.sql")

#: Postgres column types of the schema's column types.
PG_TYPES: Final[Mapping[str, str]] = {
    "string": "text",
    "bytes": "bytea",
    "bool": "boolean",
    "int32": "integer",
    "int64": "bigint",
    "uint32": "bigint",
    "uint64": "numeric(20,0)",
    "uint256": "numeric(78,0)",
    "float64": "double precision",
    "decimal": "numeric",
    "timestamp": "timestamptz",
    "date": "date",
    "json": "jsonb",
}
#: How the catalog (``format_type``) spells a type, where it differs from ``PG_TYPES``.
_CATALOG: Final = {"timestamptz": "timestamp with time zone"}
#: Postgres type changes ``ensure_table`` applies: the widenings of ``WIDENINGS``.
PG_WIDENINGS: Final = frozenset(
    (_CATALOG.get(PG_TYPES[a], PG_TYPES[a]), _CATALOG.get(PG_TYPES[b], PG_TYPES[b]))
    for a, wider in WIDENINGS.items()
    for b in wider
    if PG_TYPES[a] != PG_TYPES[b]
)


@attrs.frozen
class _RegisteredRow:
    name: str
    schema: dict[str, str]
    unique_key: list[str]


@attrs.frozen
class _ColumnRow:
    name: str
    type: str


async def schema_change_problems(
    cur: psycopg.AsyncCursor[Any], org_id: str, dag: Dag
) -> list[Problem]:
    """The problems of deploying ``dag`` over the registered schemas of the buffered datasets
    it publishes (module docstring): empty when every change is compatible."""
    buffered = [
        (p, dag.jobs[p.job].outputs[p.output])
        for p in dag.publish
        if dag.jobs[p.job].outputs[p.output].buffered
        and dag.jobs[p.job].outputs[p.output].storage is Storage.POSTGRES_TABLE
    ]
    if not buffered:
        return []
    names = sorted({p.dataset for p, _ in buffered})
    rows = await fetch_as(
        cur, _RegisteredRow, Q["registered_buffered"], {"org_id": org_id, "names": names}
    )
    registered = {r.name: r for r in rows}
    problems: list[Problem] = []
    for pub, out in buffered:
        old = registered.get(pub.dataset)
        if old is None:
            continue
        change = schema_evolution(
            DatasetSchema.of(old.schema, old.unique_key),
            DatasetSchema.of(out.schema, out.unique_key),
            dataset=pub.dataset,
            path=f"jobs.{pub.job}.outputs[{pub.output}]",
        )
        problems += [
            Problem(
                p.field or "",
                p.message,
                "a buffered dataset's table takes new nullable columns and widened types only",
            )
            for p in change.problems
        ]
    return problems


def table_ident(dataset_version: str) -> sql.Identifier:
    """The version's table as an identifier (``data.dsv_<hex>``)."""
    return sql.Identifier(DATA_SCHEMA, f"dsv_{dataset_version.replace('-', '')}")


def column_defs(schema: DatasetSchema) -> sql.Composed:
    """``"col" type, ...`` of the schema's columns."""
    return sql.SQL(", ").join(
        sql.SQL("{} {}").format(sql.Identifier(c), sql.SQL(PG_TYPES[t])) for c, t in schema.columns
    )


async def ensure_table(
    cur: psycopg.AsyncCursor[Any], dataset_version: str, schema: DatasetSchema
) -> tuple[int, int]:
    """Create the version's table if missing and evolve it to ``schema`` (module docstring),
    in the caller's transaction; returns ``(columns added, columns widened)``. Raises
    ``ValidationFailed`` (a column the table holds under a type it cannot widen to the
    declared one)."""
    table = table_ident(dataset_version)
    await cur.execute(Q["lock_table_ddl"], {"table": table_name(dataset_version)})
    constraint = sql.Identifier(f"dsv_{dataset_version.replace('-', '')}_dedupe")
    await cur.execute(
        sql.SQL(Q["create_table"]).format(
            table=table, columns=column_defs(schema), constraint=constraint
        )
    )
    rows = await fetch_as(
        cur, _ColumnRow, Q["table_columns"], {"table": table_name(dataset_version)}
    )
    have = {r.name: r.type for r in rows}
    if "_scope" not in have:  # created before rows recorded their scope
        await cur.execute(sql.SQL(Q["add_scope_column"]).format(table=table))
    added = widened = 0
    for col, typ in schema.columns:
        want = _CATALOG.get(PG_TYPES[typ], PG_TYPES[typ])
        was = have.get(col)
        if was is None:
            await cur.execute(
                sql.SQL(Q["add_column"]).format(
                    table=table, column=sql.Identifier(col), type=sql.SQL(PG_TYPES[typ])
                )
            )
            added += 1
        elif was != want:
            if (was, want) not in PG_WIDENINGS:
                raise errors.ValidationFailed(
                    f"the table's column {col!r} is {was}; the dataset declares {typ} ({want}), "
                    "which it cannot be widened to",
                    field=f"schema.{col}",
                )
            await cur.execute(
                sql.SQL(Q["widen_column"]).format(
                    table=table, column=sql.Identifier(col), type=sql.SQL(PG_TYPES[typ])
                )
            )
            widened += 1
    return added, widened


def scopes_ident(dataset_version: str) -> sql.Identifier:
    """A replace version's scope owners (``data.dsv_<hex>_scopes``)."""
    return sql.Identifier(DATA_SCHEMA, f"dsv_{dataset_version.replace('-', '')}_scopes")


async def ensure_scopes(cur: psycopg.AsyncCursor[Any], dataset_version: str) -> None:
    """Create a replace version's scope owners table and the index on its rows' ``_scope``
    if missing, in the caller's transaction (after ``ensure_table``, under its lock)."""
    hexed = dataset_version.replace("-", "")
    table, scopes = table_ident(dataset_version), scopes_ident(dataset_version)
    await cur.execute(sql.SQL(Q["create_scopes"]).format(scopes=scopes))
    index = sql.Identifier(f"dsv_{hexed}_scope")
    await cur.execute(sql.SQL(Q["index_scopes"]).format(index=index, table=table))


__all__ = [
    "PG_TYPES",
    "PG_WIDENINGS",
    "column_defs",
    "ensure_scopes",
    "ensure_table",
    "schema_change_problems",
    "scopes_ident",
    "table_ident",
]
