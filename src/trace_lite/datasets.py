"""Datasets on Postgres: registry, versions, DAG pointer sets, purge; resolve composed in.

The kernel decides: ``trace_core.access`` says who may read, overwrite, purge and release a pin.
This module reads the rows those decisions need and applies them, each operation in one
transaction. The output commit is ``trace_lite.outputs``; promotion and the staging sweep are
``trace_lite.dataset_gc``; orgs and members are ``trace_lite.orgs``; resolve with readers' pins
is ``trace_lite.dataset_resolve`` (``Datasets`` composes all three, so one object serves the
user API); the queries' rows are ``trace_lite.dataset_rows``.

Invariants kept here (``docs/architecture/data_versioning.md``):

* physical names use ``dataset_uuid`` / ``dataset_version`` only; ``current`` is a pointer;
* a cutover or rollback is one transaction that moves ``dags.active_generation``;
* a version that is active, staged (in a building rematerialization's pointer set) or pinned
  (an unexpired ``dataset_pins`` row) is never purged.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import attrs
import psycopg
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from trace_core import access, commit, errors, wire
from trace_core.access import Action, Caller, DatasetAcl, TaskCaller, UserCaller
from trace_core.commit import VersionState
from trace_core.ports import ObjectStore
from trace_core.token import CapabilityClaims
from trace_lite import sqlfile
from trace_lite.dataset_gc import DEFAULT_STAGING_GRACE_S, DatasetGC, SweepReport
from trace_lite.dataset_resolve import (
    DATA_SCHEMA,
    DEFAULT_PIN_TTL_S,
    DatasetResolver,
    Resolution,
    ResolvedDataset,
    table_name,
)
from trace_lite.dataset_rows import (
    CutoverRow,
    DagIdRow,
    DagLockRow,
    DatasetRow,
    GenerationRow,
    ListedRow,
    NewVersionRow,
    ParentRow,
    PointerSetRow,
    PurgedPartitionRow,
    PurgeLockRow,
    ReadRolesRow,
    UuidRow,
    VersionRow,
)
from trace_lite.orgs import Orgs, first
from trace_lite.outputs import INVALIDATE_TOPIC, PreparedOutputs, apply_outputs, prepare_outputs
from trace_lite.pg import fetch_as, transaction

log = logging.getLogger("trace.datasets")

Q = sqlfile.load("datasets.sql")

STORAGE_KINDS = ("parquet", "postgres", "buffered_postgres")


def _iso(ts: datetime | None) -> str | None:
    return ts.isoformat() if ts else None


# --- records ---------------------------------------------------------------------------------


@attrs.frozen
class PurgeReport:
    dataset_version: str
    deleted_objects: int
    freed_bytes: int


# --- the service -----------------------------------------------------------------------------


class Datasets:
    """Registry, versions, pointer sets and purge; org membership (``orgs``), storage upkeep
    (``gc``) and resolve/pin (``resolver``) composed in.

    ``caller=None`` on a mutating call means the platform itself (DAG deploy, tests); every
    user or task call passes a ``trace_core.access`` caller and is checked.
    """

    def __init__(
        self, pool: AsyncConnectionPool, *, object_store: ObjectStore | None = None
    ) -> None:
        self.pool = pool
        self.object_store = object_store
        self.orgs = Orgs(pool)
        self.gc = DatasetGC(pool, object_store)
        self.resolver = DatasetResolver(pool, self.orgs)
        # org membership, for the user API and the platform
        self.org_id = self.orgs.org_id
        self.user_caller = self.orgs.user_caller
        self.set_member = self.orgs.set_member
        self.remove_member = self.orgs.remove_member
        self.list_members = self.orgs.list_members
        self.ensure_dag = self.orgs.ensure_dag
        # promotion and the staging sweep
        self.promote_once = self.gc.promote_once
        self.clean_staging = self.gc.clean_staging
        self.partition_counts = self.gc.partition_counts
        self.run_background = self.gc.run_background
        # readers: resolve with pins
        self.resolve = self.resolver.resolve
        self.resolve_for_task = self.resolver.resolve_for_task
        self.release_pin = self.resolver.release_pin

    @staticmethod
    def task_caller(claims: CapabilityClaims) -> TaskCaller:
        """A task's reader identity from its verified capability token."""
        return TaskCaller.from_grants(claims.org_id, claims.task_id, claims.grants)

    # -- registry -----------------------------------------------------------------------------

    async def register(
        self,
        org: str,
        name: str,
        *,
        dag: str,
        job: str,
        output_index: int = 0,
        storage_kind: str = "parquet",
        schema: Mapping[str, Any] | None = None,
        update_strategy: str = "replace",
        unique_key: Sequence[str] = (),
        read_roles: Sequence[str] = (),
    ) -> str:
        """Register dataset ``name`` produced by ``dag``'s ``job`` output ``output_index``
        (platform call). Returns its ``dataset_uuid``. Raises ``ValidationFailed``,
        ``Conflict`` (name taken in the org), ``NotFound`` (no such DAG)."""
        if not wire._DATASET_RE.match(name):
            raise errors.ValidationFailed(
                "dataset name must match ^[a-z][a-z0-9_]{0,127}$", field="name"
            )
        if storage_kind not in STORAGE_KINDS:
            raise errors.ValidationFailed(
                f"storage_kind must be one of {STORAGE_KINDS}", field="storage_kind"
            )
        commit.UpdateStrategy(update_strategy)
        org_id = await self.org_id(org, create=True)
        async with transaction(self.pool) as cur:
            params = {"org_id": org_id, "name": dag}
            dag_row = first(await fetch_as(cur, DagIdRow, Q["dag_id_by_name"], params))
            if dag_row is None:
                raise errors.NotFound("no such DAG", field="dag")
            (row,) = await fetch_as(
                cur,
                UuidRow,
                Q["insert_dataset"],
                {
                    "org_id": org_id,
                    "name": name,
                    "dag_id": dag_row.dag_id,
                    "job_name": job,
                    "output_index": output_index,
                    "storage_kind": storage_kind,
                    "schema": Jsonb(dict(schema or {})),
                    "update_strategy": update_strategy,
                    "unique_key": list(unique_key),
                    "read_roles": sorted(set(read_roles)),
                },
            )
        return row.dataset_uuid

    async def _dataset(self, cur: psycopg.AsyncCursor[Any], org_id: str, name: str) -> DatasetRow:
        params = {"org_id": org_id, "name": name}
        row = first(await fetch_as(cur, DatasetRow, Q["dataset_by_name"], params))
        if row is None:
            raise errors.NotFound("no such dataset", field="dataset")
        return row

    async def list_datasets(self, caller: Caller, org: str) -> list[dict[str, Any]]:
        """The org's datasets the caller may read, with their active versions."""
        org_id = await self.org_id(org)
        if caller.org_id != org_id:
            raise errors.NotFound("no such org", field="org")
        async with transaction(self.pool) as cur:
            rows = await fetch_as(cur, ListedRow, Q["list_datasets"], {"org_id": org_id})
        return [
            {
                "dataset": r.name,
                "dataset_uuid": r.dataset_uuid,
                "dag": r.dag,
                "storage_kind": r.storage_kind,
                "update_strategy": r.update_strategy,
                "read_roles": list(r.read_roles),
                "active_version": r.active_version,
            }
            for r in rows
            if access.allowed(caller, r.acl(org_id), Action.READ)
        ]

    async def show(self, caller: Caller, org: str, name: str) -> dict[str, Any]:
        """A dataset with its versions (active, pinned, partition counts) and its DAG's
        recent pointer sets. Raises ``NotFound``, ``Forbidden``."""
        org_id = await self.org_id(org)
        async with transaction(self.pool) as cur:
            row = await self._dataset(cur, org_id, name)
            access.check(caller, row.acl(org_id), Action.READ)
            params = {"dataset_uuid": row.dataset_uuid}
            versions = await fetch_as(cur, VersionRow, Q["dataset_versions"], params)
            history = {"dag_id": row.dag_id, "n": 20}
            sets = await fetch_as(cur, PointerSetRow, Q["dag_pointer_history"], history)
        return {
            "dataset": row.name,
            "dataset_uuid": row.dataset_uuid,
            "dag": row.dag,
            "job": row.job_name,
            "output_index": row.output_index,
            "storage_kind": row.storage_kind,
            "update_strategy": row.update_strategy,
            "unique_key": list(row.unique_key),
            "schema": row.schema,
            "read_roles": list(row.read_roles),
            "versions": [
                {
                    "dataset_version": v.dataset_version,
                    "state": v.state,
                    "created_at": _iso(v.created_at),
                    "purged_at": _iso(v.purged_at),
                    "live_partitions": v.live_partitions,
                    "active": v.active,
                    "pins": v.pins,
                }
                for v in versions
            ],
            "pointer_sets": [
                {
                    "generation": s.generation,
                    "parent_generation": s.parent_generation,
                    "created_by": s.created_by,
                    "created_at": _iso(s.created_at),
                    "active": s.active,
                    "pointers": s.pointers,
                }
                for s in sets
            ],
        }

    async def set_read_roles(
        self, caller: UserCaller | None, org: str, name: str, roles: Sequence[str]
    ) -> list[str]:
        """Replace a dataset's ``read_roles`` (org admins). Raises ``Forbidden``, ``NotFound``."""
        org_id = await self.org_id(org)
        Orgs.require_admin(caller, org_id)
        async with transaction(self.pool) as cur:
            row = await self._dataset(cur, org_id, name)
            params = {"dataset_uuid": row.dataset_uuid, "read_roles": sorted(set(roles))}
            (out,) = await fetch_as(cur, ReadRolesRow, Q["set_read_roles"], params)
        return list(out.read_roles)

    # -- versions and pointer sets --------------------------------------------------------------

    async def open_version(self, caller: Caller | None, org: str, name: str) -> str:
        """Open a new, empty version of a dataset. Returns its ``dataset_version``.
        Raises ``NotFound``, ``Forbidden`` (needs overwrite)."""
        org_id = await self.org_id(org)
        async with transaction(self.pool) as cur:
            row = await self._dataset(cur, org_id, name)
            if caller is not None:
                access.check(caller, row.acl(org_id), Action.OVERWRITE)
            params = {"dataset_uuid": row.dataset_uuid}
            (v,) = await fetch_as(cur, NewVersionRow, Q["insert_version"], params)
        return v.dataset_version

    async def _lock_dag(self, cur: psycopg.AsyncCursor[Any], org_id: str, dag: str) -> DagLockRow:
        params = {"org_id": org_id, "name": dag}
        row = first(await fetch_as(cur, DagLockRow, Q["dag_by_name"], params))
        if row is None:
            raise errors.NotFound("no such DAG", field="dag")
        return row

    @staticmethod
    def _check_dag(caller: Caller | None, org_id: str, dag_id: str) -> None:
        if caller is not None:
            access.check(
                caller, DatasetAcl(org_id=org_id, name="*", dag_id=dag_id), Action.OVERWRITE
            )

    async def cutover(
        self, caller: Caller | None, org: str, dag: str, pointers: Mapping[str, str]
    ) -> int:
        """Point ``dag``'s datasets at new versions (``{dataset_name: dataset_version}``) in
        one transaction; datasets not named keep their versions. Returns the new generation.
        Raises ``NotFound`` (DAG, dataset not produced by it, version not of that dataset),
        ``Conflict`` (purged version, concurrent change), ``Forbidden``."""
        org_id = await self.org_id(org)
        by = getattr(caller, "subject", None) or "platform"
        async with transaction(self.pool) as cur:
            locked = await self._lock_dag(cur, org_id, dag)
            self._check_dag(caller, org_id, locked.dag_id)
            names = list(pointers)
            params = {
                "dag_id": locked.dag_id,
                "names": names,
                "versions": [pointers[n] for n in names],
            }
            found = {
                r.name: r
                for r in await fetch_as(cur, CutoverRow, Q["dag_datasets_versions"], params)
            }
            for n in names:
                r = found.get(n)
                if r is None:
                    raise errors.NotFound(f"DAG {dag!r} does not produce {n!r}", field=n)
                if r.dataset_version is None:
                    raise errors.NotFound(f"no such version of {n!r}", field=n)
                if r.state == VersionState.PURGED:
                    raise errors.Conflict(
                        f"version {r.dataset_version} of {n!r} is purged", field=n
                    )
            pointer_set = {
                "dag_id": locked.dag_id,
                "expected": locked.active_generation,
                "created_by": by,
                "dataset_uuids": [found[n].dataset_uuid for n in names],
                "versions": [pointers[n] for n in names],
            }
            row = first(await fetch_as(cur, GenerationRow, Q["insert_pointer_set"], pointer_set))
            if row is None:
                raise errors.Conflict("the pointer set changed concurrently")
        return row.generation

    async def rollback(self, caller: Caller | None, org: str, dag: str) -> int:
        """Make the active pointer set's parent active again, in one transaction. Returns the
        generation now active. Raises ``Conflict`` (no previous set, or it names a purged
        version), ``NotFound``, ``Forbidden``."""
        org_id = await self.org_id(org)
        async with transaction(self.pool) as cur:
            locked = await self._lock_dag(cur, org_id, dag)
            self._check_dag(caller, org_id, locked.dag_id)
            if locked.active_generation is None:
                raise errors.Conflict("the DAG has no active pointer set")
            params = {"dag_id": locked.dag_id, "generation": locked.active_generation}
            (parent,) = await fetch_as(cur, ParentRow, Q["pointer_set_parent"], params)
            if parent.parent_generation is None:
                raise errors.Conflict("no previous pointer set to roll back to")
            if parent.names_purged:
                raise errors.Conflict("the previous pointer set names a purged version")
            params = {
                "dag_id": locked.dag_id,
                "generation": parent.parent_generation,
                "expected": locked.active_generation,
            }
            if not await fetch_as(cur, GenerationRow, Q["activate_generation"], params):
                raise errors.Conflict("the pointer set changed concurrently")
        return parent.parent_generation

    # -- purge ------------------------------------------------------------------------------------

    async def purge(self, caller: Caller | None, org: str, name: str, version: str) -> PurgeReport:
        """Purge a version (org admins): refuse an active, staged or pinned one, mark it purged, then
        delete its objects and partitions. Re-running finishes an interrupted purge.
        Returns what was freed. Raises ``Conflict`` (active, staged or pinned), ``NotFound``,
        ``Forbidden``, ``Unavailable``."""
        org_id = await self.org_id(org)
        try:
            uuid.UUID(version)
        except ValueError:
            raise errors.ValidationFailed("version must be a UUID", field="version") from None
        async with transaction(self.pool) as cur:
            row = await self._dataset(cur, org_id, name)
            if caller is not None:
                access.check(caller, row.acl(org_id), Action.PURGE)
            params = {"version": version, "dataset_uuid": row.dataset_uuid}
            v = first(await fetch_as(cur, PurgeLockRow, Q["lock_version_for_purge"], params))
            if v is None:
                raise errors.NotFound("no such version", field="version")
            if v.active:
                raise errors.Conflict("the version is active in its DAG's pointer set")
            if v.staged:
                raise errors.Conflict("the version is in the pointer set of a building staging")
            if v.pinned:
                raise errors.Conflict("the version is pinned by a reader")
            await cur.execute(Q["mark_purged"], {"version": version})
        deleted = freed = 0
        while True:
            async with transaction(self.pool) as cur:
                batch = {"version": version, "n": 500}
                parts = await fetch_as(cur, PurgedPartitionRow, Q["purged_partitions"], batch)
            if not parts:
                break
            if self.object_store is None:
                raise errors.Unavailable("no object store to free the version's objects")
            for p in parts:
                for key in {p.object_key, p.staged_key}:
                    with contextlib.suppress(errors.NotFound):
                        info = await self.object_store.head(key)
                        freed += info.size
                        deleted += 1
                    await self.object_store.delete(key)
            async with transaction(self.pool) as cur:
                ids = [p.partition_id for p in parts]
                await cur.execute(Q["delete_partitions"], {"ids": ids})
        log.info(
            "version purged",
            extra={"dataset": name, "dataset_version": version, "deleted_objects": deleted},
        )
        return PurgeReport(version, deleted, freed)


__all__ = [
    "DATA_SCHEMA",
    "DEFAULT_PIN_TTL_S",
    "DEFAULT_STAGING_GRACE_S",
    "INVALIDATE_TOPIC",
    "Datasets",
    "PreparedOutputs",
    "PurgeReport",
    "Resolution",
    "ResolvedDataset",
    "SweepReport",
    "apply_outputs",
    "prepare_outputs",
    "table_name",
]
