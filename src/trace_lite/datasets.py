"""Datasets on Postgres: registry, versions, DAG pointer sets, the output commit, readers' pins.

The kernel decides: ``trace_core.commit`` plans what a manifest writes, ``trace_core.access``
says who may read, overwrite and purge. This module reads the rows those decisions need and
applies them, each operation in one transaction.

Invariants kept here (``docs/architecture/data_versioning.md``):

* physical names use ``dataset_uuid`` / ``dataset_version`` only; ``current`` is a pointer;
* a cutover or rollback is one transaction that moves ``dags.active_generation``; a resolve
  reads every active pointer it needs in one statement, so it sees a whole set, never a mix;
* an attempt's outputs become partitions only inside its completion's transaction, fenced on
  ``(task_id, attempt, lease_token)`` (``apply_outputs`` is called by ``Dispatcher.complete_many``
  between the lifecycle decision and the fenced CAS);
* a version that is active or pinned (an unexpired ``dataset_pins`` row) is never purged.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
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
from trace_core.access import Action, Caller, DatasetAcl, PinAcl, TaskCaller, UserCaller
from trace_core.object_keys import is_within, staging_prefix, validate_key
from trace_core.ports import ObjectInfo, ObjectStore
from trace_core.token import CapabilityClaims
from trace_lite import sqlfile
from trace_lite.pg import transaction

log = logging.getLogger("trace.datasets")

Q = sqlfile.load("datasets.sql")

#: Outbox topic of invalidations emitted by replace rewrites.
INVALIDATE_TOPIC = "dataset.invalidate"
STORAGE_KINDS = ("parquet", "postgres", "buffered_postgres")
#: Default pin lease of a resolve (a reader's query must finish, or renew, within it).
DEFAULT_PIN_TTL_S = 300.0
#: Default grace before a finished attempt's staging prefix is cleaned.
DEFAULT_STAGING_GRACE_S = 3600.0
_HEAD_CONCURRENCY = 64
#: Manifests longer than this are checked against one listing of the staging prefix.
_LIST_OVER = 32


#: The schema of dataset tables in the data database (created by data migration 0001).
DATA_SCHEMA = "data"


def table_name(dataset_version: str) -> str:
    """The Postgres data table of a version of a ``postgres`` dataset (UUID-named), qualified
    with ``DATA_SCHEMA``: ``data.dsv_{hex}``."""
    return f"{DATA_SCHEMA}.dsv_{uuid.UUID(dataset_version).hex}"


# --- records ---------------------------------------------------------------------------------


@attrs.frozen
class ResolvedDataset:
    """One dataset pinned to a version, and what to read."""

    dataset: str
    dataset_uuid: str
    #: ``None`` when the producing DAG has no active version of it yet.
    dataset_version: str | None
    storage_kind: str
    #: Canonical keys of the live, promoted partitions (``parquet``), with their scope: bytes
    #: verified against the commit, which the producer can no longer change.
    objects: list[dict[str, Any]] = attrs.field(factory=list)
    #: The Postgres table (``postgres`` / ``buffered_postgres``).
    table: str | None = None
    #: Live partitions committed but not promoted yet (not in ``objects``; a later resolve
    #: sees them once promotion has verified them).
    pending: int = 0
    #: Live partitions whose staged bytes did not match their commit (never readable).
    corrupt: int = 0


@attrs.frozen
class Resolution:
    #: The pin lease; release it when the read ends (it expires on its own otherwise).
    pin_id: str
    datasets: list[ResolvedDataset]


@attrs.frozen
class PurgeReport:
    dataset_version: str
    deleted_objects: int
    freed_bytes: int


@attrs.frozen
class SweepReport:
    attempts: int = 0
    deleted_objects: int = 0
    skipped: int = 0


# --- the commit hook (called by Dispatcher.complete_many) -------------------------------------


@attrs.frozen
class PreparedOutputs:
    """A completion's manifest, checked against the ObjectStore before the transaction."""

    org_id: str
    entries: tuple[commit.ManifestEntry, ...]


def _entries(req: wire.CompleteRequest) -> list[commit.ManifestEntry]:
    return [
        commit.ManifestEntry(
            dataset=o.dataset,
            object_key=o.object_key,
            size=o.size,
            sha256=o.sha256,
            start=o.partition.start,
            end=o.partition.end,
            key=o.partition.key,
            version=o.version,
        )
        for o in req.outputs
    ]


async def prepare_outputs(
    pool: AsyncConnectionPool, store: ObjectStore | None, reqs: Sequence[wire.CompleteRequest]
) -> dict[int, PreparedOutputs | errors.TraceError]:
    """Check the manifests of ``reqs`` (those with ``outputs``) before the completion's
    transaction: keys safe and inside the attempt's staging prefix (checked before any
    ``head``), objects exist, sizes and checksums match. Returns, per request index, the
    prepared manifest or the error to answer with. Raises ``Unavailable``."""
    todo = {i: r for i, r in enumerate(reqs) if r.outputs}
    out: dict[int, PreparedOutputs | errors.TraceError] = {}
    if not todo:
        return out
    async with transaction(pool) as cur:
        await cur.execute(Q["task_orgs"], {"task_ids": [r.task_id for r in todo.values()]})
        orgs = dict(await cur.fetchall())
    sem = asyncio.Semaphore(_HEAD_CONCURRENCY)

    async def head(key: str) -> ObjectInfo | None:
        assert store is not None
        async with sem:
            try:
                return await store.head(key)
            except errors.NotFound:
                return None

    for i, r in todo.items():
        org_id = orgs.get(r.task_id)
        if org_id is None:
            continue  # complete_many answers NotFound
        try:
            if r.outcome != "succeeded":
                raise errors.ValidationFailed(
                    "outputs are committed only with a succeeded outcome", field="outputs"
                )
            if store is None:
                raise errors.Unavailable("this Dispatcher has no object store")
            prefix = staging_prefix(org_id, r.task_id, r.attempt)
            entries = _entries(r)
            for n, e in enumerate(entries):  # refuse unsafe keys before touching storage
                try:
                    validate_key(e.object_key)
                    inside = is_within(e.object_key, prefix)
                except errors.UnsafeKey as exc:
                    raise errors.UnsafeKey(exc.message, field=f"outputs[{n}].object_key") from None
                if not inside:
                    raise errors.UnsafeKey(
                        f"object_key must lie under this attempt's staging prefix {prefix}",
                        field=f"outputs[{n}].object_key",
                    )
            if len(entries) > _LIST_OVER:
                # one listing of the attempt's staging prefix instead of a head per object
                listed = {info.key: info for info in await store.list(prefix)}
                heads = [listed.get(e.object_key) for e in entries]
            else:
                heads = await asyncio.gather(*(head(e.object_key) for e in entries))
            for n, (e, h) in enumerate(zip(entries, heads, strict=True)):
                commit.check_entry(e, n, staging_prefix=prefix, head=h)
            out[i] = PreparedOutputs(org_id, tuple(entries))
        except errors.TraceError as exc:
            out[i] = exc
    return out


async def apply_outputs(
    cur: psycopg.AsyncCursor[Any], req: wire.CompleteRequest, prepared: PreparedOutputs
) -> commit.CommitPlan:
    """Record a checked manifest into its dataset versions, inside the completion's
    transaction (a savepoint: a refusal leaves the other completions of the batch intact).

    Returns the plan applied. Raises ``NotFound`` (unknown dataset in the org, or no active
    version and none named), ``Conflict`` (purged version, a concurrent commit of the same
    partition), ``ValidationFailed`` (see ``trace_core.commit.plan_commit``).
    """
    entries = prepared.entries
    try:
        async with cur.connection.transaction():
            names = [e.dataset for e in entries]
            versions = [e.version for e in entries]
            await cur.execute(
                Q["commit_targets"],
                {"org_id": prepared.org_id, "names": names, "versions": versions},
            )
            found = {(r[0], r[1]): r for r in await cur.fetchall()}
            targets: list[commit.Target] = []
            for n, e in enumerate(entries):
                row = found.get((e.dataset, e.version))
                if row is None:
                    raise errors.NotFound(
                        f"dataset {e.dataset!r} does not exist in this org or has no "
                        + ("such version" if e.version else "active version"),
                        field=f"outputs[{n}].dataset",
                    )
                targets.append(
                    commit.Target(
                        org_id=prepared.org_id,
                        dataset_uuid=row[2],
                        update_strategy=commit.UpdateStrategy(row[3]),
                        dataset_version=row[4],
                        version_state=commit.VersionState(row[5]),
                    )
                )
            ranges = [
                (e.start, e.end) for e in entries if e.start is not None and e.end is not None
            ]
            keys = [e.key for e in entries if e.key is not None]
            await cur.execute(
                Q["live_partitions"],
                {
                    "versions": sorted({t.dataset_version for t in targets}),
                    "min_start": min((s for s, _ in ranges), default=0),
                    "max_end": max((x for _, x in ranges), default=0),
                    "keys": keys,
                },
            )
            live = [
                commit.LivePartition(r[0], r[1], r[2], r[3], r[4]) for r in await cur.fetchall()
            ]
            plan = commit.plan_commit(
                entries, targets, live, task_id=req.task_id, attempt=req.attempt
            )
            if plan.supersede:
                await cur.execute(Q["supersede_partitions"], {"ids": list(plan.supersede)})
            if plan.inserts:
                ins = plan.inserts
                await cur.execute(
                    Q["insert_partitions"],
                    {
                        "task_id": req.task_id,
                        "attempt": req.attempt,
                        "versions": [p.dataset_version for p in ins],
                        "starts": [p.start for p in ins],
                        "ends": [p.end for p in ins],
                        "keys": [p.key for p in ins],
                        "object_keys": [p.object_key for p in ins],
                        "staged_keys": [p.staged_key for p in ins],
                        "sizes": [p.size for p in ins],
                        "shas": [p.sha256 for p in ins],
                    },
                )
            if plan.invalidations:
                await cur.execute(
                    Q["insert_outbox_many"],
                    {
                        "topic": INVALIDATE_TOPIC,
                        "payloads": [
                            Jsonb(
                                {
                                    **attrs.asdict(inv),
                                    "task_id": req.task_id,
                                    "attempt": req.attempt,
                                }
                            )
                            for inv in plan.invalidations
                        ],
                    },
                )
            return plan
    except psycopg.errors.UniqueViolation as exc:
        raise errors.Conflict("a concurrent commit wrote the same partition") from exc


# --- the service -----------------------------------------------------------------------------


class Datasets:
    """Registry, versions, pointer sets, resolve/pin, purge and staging cleanup.

    ``caller=None`` on a mutating call means the platform itself (DAG deploy, tests); every
    user or task call passes a ``trace_core.access`` caller and is checked.
    """

    def __init__(
        self, pool: AsyncConnectionPool, *, object_store: ObjectStore | None = None
    ) -> None:
        self.pool = pool
        self.object_store = object_store
        self._orgs: dict[str, str] = {}

    # -- orgs, members, DAGs ------------------------------------------------------------------

    async def org_id(self, name: str, *, create: bool = False) -> str:
        """The id of org ``name``. Raises ``NotFound`` unless ``create``."""
        cached = self._orgs.get(name)
        if cached:
            return cached
        async with transaction(self.pool) as cur:
            await cur.execute(Q["ensure_org" if create else "org_by_name"], {"name": name})
            row = await cur.fetchone()
        if row is None:
            raise errors.NotFound("no such org", field="org")
        self._orgs[name] = row[0]
        return str(row[0])

    async def resolve_for_task(
        self,
        claims: CapabilityClaims,
        names: Sequence[str],
        *,
        pin_ttl_s: float = DEFAULT_PIN_TTL_S,
    ) -> Resolution:
        """Resolve for a task: only the datasets its capability token grants, in the org of the
        task's row (never the token's ``org_id`` claim alone: a token whose claim names another
        org is refused). Raises as ``resolve``, and ``Unauthenticated`` for that mismatch."""
        async with transaction(self.pool) as cur:
            await cur.execute(Q["task_org"], {"task_id": claims.task_id})
            rows = await _dicts(cur)
        if not rows:
            raise errors.NotFound("no such task", field="task_id")
        task = rows[0]
        if task["org_id"] != claims.org_id:
            raise errors.Unauthenticated("capability token: org_id is not the task's org")
        caller = TaskCaller.from_grants(task["org_id"], claims.task_id, claims.grants)
        return await self.resolve(caller, task["org_name"], names, pin_ttl_s=pin_ttl_s)

    async def user_caller(self, org: str, subject: str) -> UserCaller:
        """The user's membership in ``org``, read from Postgres (never from the token).

        Raises ``NotFound`` ("no such org") for an unknown org *and* for an org the subject
        neither belongs to nor holds a DAG grant in: a non-member cannot tell the two apart."""
        org_id = await self.org_id(org)
        async with transaction(self.pool) as cur:
            await cur.execute(Q["member"], {"org_id": org_id, "subject": subject})
            roles, dags, member = await _one(cur)
        if not member and not dags:
            raise errors.NotFound("no such org", field="org")
        return UserCaller(
            subject=subject,
            org_id=org_id,
            roles=frozenset(roles),
            dags=frozenset(dags),
            member=bool(member),
        )

    @staticmethod
    def task_caller(claims: CapabilityClaims) -> TaskCaller:
        """A task's reader identity from its verified capability token."""
        return TaskCaller.from_grants(claims.org_id, claims.task_id, claims.grants)

    def _require_admin(self, caller: UserCaller | None, org_id: str) -> None:
        if caller is None:
            return
        if caller.org_id != org_id or not (caller.member or caller.dags):
            raise errors.NotFound("no such org", field="org")
        if not caller.is_admin:
            raise errors.Forbidden("org admins only")

    async def set_member(
        self, caller: UserCaller | None, org: str, subject: str, roles: Sequence[str]
    ) -> dict[str, Any]:
        """Add or update a member's roles (org admins). Raises ``Forbidden``, ``NotFound``."""
        org_id = await self.org_id(org, create=caller is None)
        self._require_admin(caller, org_id)
        async with transaction(self.pool) as cur:
            await cur.execute(
                Q["upsert_member"],
                {"org_id": org_id, "subject": subject, "roles": sorted(set(roles))},
            )
            subj, r = await _one(cur)
        return {"subject": subj, "roles": list(r)}

    async def remove_member(self, caller: UserCaller | None, org: str, subject: str) -> None:
        org_id = await self.org_id(org)
        self._require_admin(caller, org_id)
        async with transaction(self.pool) as cur:
            await cur.execute(Q["delete_member"], {"org_id": org_id, "subject": subject})
            if await cur.fetchone() is None:
                raise errors.NotFound("no such member", field="subject")

    async def list_members(self, caller: UserCaller | None, org: str) -> list[dict[str, Any]]:
        org_id = await self.org_id(org)
        self._require_admin(caller, org_id)
        async with transaction(self.pool) as cur:
            await cur.execute(Q["list_members"], {"org_id": org_id})
            return [{"subject": s, "roles": list(r)} for s, r in await cur.fetchall()]

    async def ensure_dag(
        self, org: str, name: str, *, deployers: Sequence[str] = (), triggerers: Sequence[str] = ()
    ) -> str:
        """Create DAG ``name`` (platform call; YAML deploy comes later) and add members.
        Returns its id."""
        org_id = await self.org_id(org, create=True)
        async with transaction(self.pool) as cur:
            await cur.execute(Q["ensure_dag"], {"org_id": org_id, "name": name})
            (dag_id,) = await _one(cur)
            for relation, subjects in (("deployer", deployers), ("triggerer", triggerers)):
                for s in subjects:
                    await cur.execute(
                        Q["add_dag_member"], {"dag_id": dag_id, "subject": s, "relation": relation}
                    )
        return str(dag_id)

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
            await cur.execute(
                "SELECT dag_id::text FROM dags WHERE org_id = %s AND name = %s", (org_id, dag)
            )
            dag_row = await cur.fetchone()
            if dag_row is None:
                raise errors.NotFound("no such DAG", field="dag")
            await cur.execute(
                Q["insert_dataset"],
                {
                    "org_id": org_id,
                    "name": name,
                    "dag_id": dag_row[0],
                    "job_name": job,
                    "output_index": output_index,
                    "storage_kind": storage_kind,
                    "schema": Jsonb(dict(schema or {})),
                    "update_strategy": update_strategy,
                    "unique_key": list(unique_key),
                    "read_roles": sorted(set(read_roles)),
                },
            )
            (dataset_uuid,) = await _one(cur)
        return str(dataset_uuid)

    async def _dataset(
        self, cur: psycopg.AsyncCursor[Any], org_id: str, name: str
    ) -> tuple[Any, ...]:
        await cur.execute(Q["dataset_by_name"], {"org_id": org_id, "name": name})
        row = await cur.fetchone()
        if row is None:
            raise errors.NotFound("no such dataset", field="dataset")
        return tuple(row)

    @staticmethod
    def _acl(org_id: str, row: Sequence[Any]) -> DatasetAcl:
        return DatasetAcl(org_id=org_id, name=row[1], dag_id=row[2], read_roles=frozenset(row[3]))

    async def list_datasets(self, caller: Caller, org: str) -> list[dict[str, Any]]:
        """The org's datasets the caller may read, with their active versions."""
        org_id = await self.org_id(org)
        if caller.org_id != org_id:
            raise errors.NotFound("no such org", field="org")
        async with transaction(self.pool) as cur:
            await cur.execute(Q["list_datasets"], {"org_id": org_id})
            rows = await cur.fetchall()
        return [
            {
                "dataset": r[1],
                "dataset_uuid": r[0],
                "dag": r[6],
                "storage_kind": r[4],
                "update_strategy": r[5],
                "read_roles": list(r[3]),
                "active_version": r[7],
            }
            for r in rows
            if access.allowed(caller, self._acl(org_id, r), Action.READ)
        ]

    async def show(self, caller: Caller, org: str, name: str) -> dict[str, Any]:
        """A dataset with its versions (active, pinned, partition counts) and its DAG's
        recent pointer sets. Raises ``NotFound``, ``Forbidden``."""
        org_id = await self.org_id(org)
        async with transaction(self.pool) as cur:
            row = await self._dataset(cur, org_id, name)
            access.check(caller, self._acl(org_id, row), Action.READ)
            await cur.execute(Q["dataset_versions"], {"dataset_uuid": row[0]})
            versions = [
                {
                    "dataset_version": v,
                    "state": st,
                    "created_at": _iso(c),
                    "purged_at": _iso(p),
                    "live_partitions": n,
                    "active": act,
                    "pins": pins,
                }
                for v, st, c, p, n, act, pins in await cur.fetchall()
            ]
            await cur.execute(Q["dag_pointer_history"], {"dag_id": row[2], "n": 20})
            sets = [
                {
                    "generation": g,
                    "parent_generation": pg,
                    "created_by": by,
                    "created_at": _iso(at),
                    "active": act,
                    "pointers": ptrs,
                }
                for g, pg, by, at, act, ptrs in await cur.fetchall()
            ]
        return {
            "dataset": row[1],
            "dataset_uuid": row[0],
            "dag": row[10],
            "job": row[7],
            "output_index": row[8],
            "storage_kind": row[4],
            "update_strategy": row[5],
            "unique_key": list(row[6]),
            "schema": row[9],
            "read_roles": list(row[3]),
            "versions": versions,
            "pointer_sets": sets,
        }

    async def set_read_roles(
        self, caller: UserCaller | None, org: str, name: str, roles: Sequence[str]
    ) -> list[str]:
        """Replace a dataset's ``read_roles`` (org admins). Raises ``Forbidden``, ``NotFound``."""
        org_id = await self.org_id(org)
        self._require_admin(caller, org_id)
        async with transaction(self.pool) as cur:
            row = await self._dataset(cur, org_id, name)
            await cur.execute(
                Q["set_read_roles"], {"dataset_uuid": row[0], "read_roles": sorted(set(roles))}
            )
            (r,) = await _one(cur)
        return list(r)

    # -- versions and pointer sets --------------------------------------------------------------

    async def open_version(self, caller: Caller | None, org: str, name: str) -> str:
        """Open a new, empty version of a dataset. Returns its ``dataset_version``.
        Raises ``NotFound``, ``Forbidden`` (needs overwrite)."""
        org_id = await self.org_id(org)
        async with transaction(self.pool) as cur:
            row = await self._dataset(cur, org_id, name)
            if caller is not None:
                access.check(caller, self._acl(org_id, row), Action.OVERWRITE)
            await cur.execute(Q["insert_version"], {"dataset_uuid": row[0]})
            (version,) = await _one(cur)
        return str(version)

    async def _lock_dag(
        self, cur: psycopg.AsyncCursor[Any], org_id: str, dag: str
    ) -> tuple[str, int | None]:
        await cur.execute(Q["dag_by_name"], {"org_id": org_id, "name": dag})
        row = await cur.fetchone()
        if row is None:
            raise errors.NotFound("no such DAG", field="dag")
        return str(row[0]), row[1]

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
            dag_id, active = await self._lock_dag(cur, org_id, dag)
            self._check_dag(caller, org_id, dag_id)
            names = list(pointers)
            await cur.execute(
                Q["dag_datasets_versions"],
                {"dag_id": dag_id, "names": names, "versions": [pointers[n] for n in names]},
            )
            rows = {r[0]: r for r in await cur.fetchall()}
            for n in names:
                r = rows.get(n)
                if r is None:
                    raise errors.NotFound(f"DAG {dag!r} does not produce {n!r}", field=n)
                if r[2] is None:
                    raise errors.NotFound(f"no such version of {n!r}", field=n)
                if r[3] == commit.VersionState.PURGED:
                    raise errors.Conflict(f"version {r[2]} of {n!r} is purged", field=n)
            await cur.execute(
                Q["insert_pointer_set"],
                {
                    "dag_id": dag_id,
                    "expected": active,
                    "created_by": by,
                    "dataset_uuids": [rows[n][1] for n in names],
                    "versions": [pointers[n] for n in names],
                },
            )
            row = await cur.fetchone()
            if row is None:
                raise errors.Conflict("the pointer set changed concurrently")
        return int(row[0])

    async def rollback(self, caller: Caller | None, org: str, dag: str) -> int:
        """Make the active pointer set's parent active again, in one transaction. Returns the
        generation now active. Raises ``Conflict`` (no previous set, or it names a purged
        version), ``NotFound``, ``Forbidden``."""
        org_id = await self.org_id(org)
        async with transaction(self.pool) as cur:
            dag_id, active = await self._lock_dag(cur, org_id, dag)
            self._check_dag(caller, org_id, dag_id)
            if active is None:
                raise errors.Conflict("the DAG has no active pointer set")
            await cur.execute(Q["pointer_set_parent"], {"dag_id": dag_id, "generation": active})
            parent, purged = await _one(cur)
            if parent is None:
                raise errors.Conflict("no previous pointer set to roll back to")
            if purged:
                raise errors.Conflict("the previous pointer set names a purged version")
            await cur.execute(
                Q["activate_generation"],
                {"dag_id": dag_id, "generation": parent, "expected": active},
            )
            if await cur.fetchone() is None:
                raise errors.Conflict("the pointer set changed concurrently")
        return int(parent)

    # -- readers --------------------------------------------------------------------------------

    async def resolve(
        self,
        caller: Caller,
        org: str,
        names: Sequence[str],
        *,
        pin_ttl_s: float = DEFAULT_PIN_TTL_S,
        include_objects: bool = True,
    ) -> Resolution:
        """Check read permission and pin each name to its active version, once.

        Every pointer is read in one statement (a whole pointer set, never a mix) and a pin
        lease row is written for each version (unless ``pin_ttl_s`` is 0) so it cannot be
        purged while the reader reads. Returns the pins and what to read. Raises ``NotFound``
        (unknown name or org, or a caller of another org), ``Forbidden``.
        """
        if not names:
            raise errors.ValidationFailed("name at least one dataset", field="names")
        org_id = await self.org_id(org)
        if caller.org_id != org_id:
            raise errors.NotFound("no such dataset", field="names")
        subject = access.pin_holder(caller)
        for _ in range(3):
            pin_id = str(uuid.uuid4())
            try:
                async with transaction(self.pool) as cur:
                    await cur.execute(
                        Q["resolve"],
                        {
                            "org_id": org_id,
                            "names": list(names),
                            "pin_id": pin_id,
                            "subject": subject,
                            "ttl_s": pin_ttl_s,
                        },
                    )
                    rows = {r[0]: r for r in await cur.fetchall()}
                    for n, name in enumerate(names):
                        row = rows.get(name)
                        if row is None:
                            raise errors.NotFound(f"no such dataset {name!r}", field=f"names[{n}]")
                        access.check(
                            caller,
                            DatasetAcl(org_id, row[0], row[2], frozenset(row[3])),
                            Action.READ,
                        )
                    if any(r[6] == commit.VersionState.PURGED for r in rows.values()):
                        raise _PurgedUnderUs()
                    objects: dict[str, list[dict[str, Any]]] = {}
                    unread: dict[tuple[str, str], int] = {}
                    parquet = [r[5] for r in rows.values() if r[5] and r[4] == "parquet"]
                    if include_objects and parquet:
                        await cur.execute(Q["version_objects"], {"versions": parquet})
                        for p in await _dicts(cur):
                            v = p["dataset_version"]
                            if p["state"] != commit.PartitionState.PROMOTED:
                                unread[v, p["state"]] = unread.get((v, p["state"]), 0) + 1
                                continue
                            item: dict[str, Any] = {
                                "object_key": p["object_key"],
                                "size": p["size"],
                            }
                            if p["partition_key"] is None:
                                item.update(start=p["range_start"], end=p["range_end"])
                            else:
                                item.update(key=p["partition_key"])
                            objects.setdefault(v, []).append(item)
            except _PurgedUnderUs:
                continue
            break
        else:  # pragma: no cover - three purges racing three resolves
            raise errors.Unavailable("versions were purged while resolving; retry")
        out = []
        for name in dict.fromkeys(names):
            r = rows[name]
            version = r[5]
            out.append(
                ResolvedDataset(
                    dataset=name,
                    dataset_uuid=r[1],
                    dataset_version=version,
                    storage_kind=r[4],
                    objects=objects.get(version, []) if version else [],
                    table=table_name(version) if version and r[4] != "parquet" else None,
                    pending=unread.get((version or "", commit.PartitionState.COMMITTED), 0),
                    corrupt=unread.get((version or "", commit.PartitionState.CORRUPT), 0),
                )
            )
        return Resolution(pin_id=pin_id, datasets=out)

    async def release_pin(self, caller: Caller | None, org: str, pin_id: str) -> None:
        """Release a reader's pin early: its holder or an admin of its org, through that org.

        Returns None. Raises ``NotFound`` (no such pin in ``org``, or a caller outside it),
        ``Forbidden`` (a member who neither holds the pin nor is an admin); nothing is
        deleted on a refusal."""
        org_id = await self.org_id(org)
        async with transaction(self.pool) as cur:
            await cur.execute(Q["lock_pin"], {"pin_id": pin_id})
            rows = await _dicts(cur)
            pins = {PinAcl(org_id=r["org_id"], holder=r["holder"]) for r in rows}
            if len(pins) != 1 or next(iter(pins)).org_id != org_id:
                raise errors.NotFound("no such pin", field="pin_id")
            if caller is not None:
                access.check_release(caller, next(iter(pins)))
            await cur.execute(Q["release_pin"], {"pin_id": pin_id})

    # -- purge ------------------------------------------------------------------------------------

    async def purge(self, caller: Caller | None, org: str, name: str, version: str) -> PurgeReport:
        """Purge a version (org admins): refuse an active or pinned one, mark it purged, then
        delete its objects and partitions. Re-running finishes an interrupted purge.
        Returns what was freed. Raises ``Conflict`` (active or pinned), ``NotFound``,
        ``Forbidden``, ``Unavailable``."""
        org_id = await self.org_id(org)
        try:
            uuid.UUID(version)
        except ValueError:
            raise errors.ValidationFailed("version must be a UUID", field="version") from None
        async with transaction(self.pool) as cur:
            row = await self._dataset(cur, org_id, name)
            if caller is not None:
                access.check(caller, self._acl(org_id, row), Action.PURGE)
            await cur.execute(
                Q["lock_version_for_purge"], {"version": version, "dataset_uuid": row[0]}
            )
            v = await cur.fetchone()
            if v is None:
                raise errors.NotFound("no such version", field="version")
            _state, active, pinned = v
            if active:
                raise errors.Conflict("the version is active in its DAG's pointer set")
            if pinned:
                raise errors.Conflict("the version is pinned by a reader")
            await cur.execute(Q["mark_purged"], {"version": version})
        deleted = freed = 0
        while True:
            async with transaction(self.pool) as cur:
                await cur.execute(Q["purged_partitions"], {"version": version, "n": 500})
                parts = await cur.fetchall()
            if not parts:
                break
            if self.object_store is None:
                raise errors.Unavailable("no object store to free the version's objects")
            for _pid, object_key, staged_key in parts:
                for key in {object_key, staged_key}:
                    with contextlib.suppress(errors.NotFound):
                        info = await self.object_store.head(key)
                        freed += info.size
                        deleted += 1
                    await self.object_store.delete(key)
            async with transaction(self.pool) as cur:
                await cur.execute(Q["delete_partitions"], {"ids": [p[0] for p in parts]})
        log.info(
            "version purged",
            extra={"dataset": name, "dataset_version": version, "deleted_objects": deleted},
        )
        return PurgeReport(version, deleted, freed)

    # -- background: promotion and staging cleanup ------------------------------------------------

    async def promote_once(self, batch: int = 200) -> int:
        """Verify committed partitions and copy them from the staging prefix to their canonical
        key under the version prefix; only then do readers see them.

        The staged bytes are read once and checked against the size and sha256 the completion
        committed (``trace_core.commit.promotion_event``); a mismatch or a missing object marks
        the partition ``corrupt`` and is logged once at error level (never retried). Returns
        how many were promoted. Raises ``Unavailable``."""
        if self.object_store is None:
            return 0
        store = self.object_store
        async with transaction(self.pool) as cur:
            await cur.execute(Q["unpromoted"], {"n": batch})
            rows = await _dicts(cur)
        promoted: list[int] = []
        corrupt: dict[int, dict[str, Any]] = {}
        for p in rows:
            try:
                data: bytes | None = await store.get(p["staged_key"])
            except errors.NotFound:
                data = None
            staged = (
                None
                if data is None
                else ObjectInfo(p["staged_key"], len(data), hashlib.sha256(data).hexdigest())
            )
            event = commit.promotion_event(p["size"], p["sha256"], staged)
            match commit.partition_target(commit.PartitionState.COMMITTED, event):
                case commit.PartitionState.PROMOTED:
                    assert data is not None
                    await store.put(p["object_key"], data)
                    promoted.append(p["partition_id"])
                case _:
                    corrupt[p["partition_id"]] = {**p, "found": staged}
        marked: list[int] = []
        async with transaction(self.pool) as cur:
            if promoted:
                await cur.execute(Q["mark_promoted"], {"ids": promoted})
            if corrupt:
                await cur.execute(Q["mark_corrupt"], {"ids": list(corrupt)})
                marked = [r["partition_id"] for r in await _dicts(cur)]
        for pid in marked:
            p = corrupt[pid]
            found = p["found"]
            log.error(
                "committed partition is corrupt: its staged bytes do not match the commit",
                extra={
                    "partition_id": pid,
                    "dataset_version": p["dataset_version"],
                    "task_id": p["task_id"],
                    "attempt": p["attempt"],
                    "staged_key": p["staged_key"],
                    "expected_size": p["size"],
                    "expected_sha256": p["sha256"],
                    "found_size": None if found is None else found.size,
                    "found_sha256": None if found is None else found.sha256,
                },
            )
        return len(promoted)

    async def partition_counts(self) -> dict[str, int]:
        """Partitions by ``PartitionState`` (``corrupt`` > 0 is an alarm). Raises
        ``Unavailable``."""
        async with transaction(self.pool) as cur:
            await cur.execute(Q["partition_counts"])
            found = {r["state"]: int(r["n"]) for r in await _dicts(cur)}
        return {s.value: found.get(s.value, 0) for s in commit.PartitionState}

    async def clean_staging(
        self, *, grace_s: float = DEFAULT_STAGING_GRACE_S, batch: int = 200
    ) -> SweepReport:
        """Delete staged objects of attempts that finished more than ``grace_s`` ago.

        Objects of an attempt that never committed are never visible (no partition names
        them); an attempt whose committed partitions are not promoted yet is skipped and
        revisited later. Each attempt is cleaned once. Returns the counts."""
        if self.object_store is None:
            raise errors.Unavailable("no object store to clean")
        report = SweepReport()
        async with transaction(self.pool) as cur:
            await cur.execute(Q["unswept_attempts"], {"grace_s": grace_s, "n": batch})
            attempts = await cur.fetchall()
        for task_id, attempt, org_id in attempts:
            async with transaction(self.pool) as cur:
                await cur.execute(
                    Q["referenced_staged_keys"], {"task_id": task_id, "attempt": attempt}
                )
                if await cur.fetchone() is not None:
                    report = attrs.evolve(report, skipped=report.skipped + 1)
                    continue
            prefix = staging_prefix(org_id, task_id, attempt)
            objects = await self.object_store.list(prefix)
            for info in objects:
                await self.object_store.delete(info.key)
            async with transaction(self.pool) as cur:
                await cur.execute(
                    Q["record_sweep"],
                    {"task_id": task_id, "attempt": attempt, "deleted": len(objects)},
                )
            report = attrs.evolve(
                report,
                attempts=report.attempts + 1,
                deleted_objects=report.deleted_objects + len(objects),
            )
        return report

    async def run_background(
        self, stop: asyncio.Event, *, every_s: float = 5.0, grace_s: float = DEFAULT_STAGING_GRACE_S
    ) -> None:
        """Promote committed partitions and sweep staging until ``stop`` is set."""
        while not stop.is_set():
            try:
                while await self.promote_once():
                    pass
                if self.object_store is not None:
                    await self.clean_staging(grace_s=grace_s)
            except errors.TraceError as exc:
                log.warning("dataset background pass failed", extra={"error": str(exc)})
            except Exception:  # a bug must not stop the sweep: log it, keep going
                log.exception("dataset background pass crashed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every_s)


class _PurgedUnderUs(errors.Retryable):
    """A version was purged between the pointer read and the pin; resolve again."""


async def _dicts(cur: psycopg.AsyncCursor[Any]) -> list[dict[str, Any]]:
    """The rows of the last statement, by column name."""
    assert cur.description is not None
    names = [c.name for c in cur.description]
    return [dict(zip(names, row, strict=True)) for row in await cur.fetchall()]


async def _one(cur: psycopg.AsyncCursor[Any]) -> Any:
    row = await cur.fetchone()
    if row is None:  # pragma: no cover - the statements always return a row
        raise errors.NotFound("not found")
    return row


def _iso(ts: datetime | None) -> str | None:
    return ts.isoformat() if ts else None


__all__ = [
    "DATA_SCHEMA",
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
