"""Resolve: pin each named dataset to its active version, and say what to read.

A reader (a user's query, a task's inputs) names datasets; ``DatasetResolver`` checks read
permission on each (``trace_core.access``) and hands back, per dataset, the version its DAG's
active pointer set names (or a staged set, for a rebuild) with what to read. Invariants kept
here (``docs/architecture/data_versioning.md``):

* every pointer is read in one statement, so a reader sees a whole pointer set, never a mix;
* each version handed out is pinned (an unexpired ``dataset_pins`` row) in that same
  transaction, so it is not purged while the reader reads;
* a reader is handed promoted partitions only (verified bytes at their canonical key);
* a pin is released only by its holder or an admin of its org, through that org.

``trace_lite.datasets.Datasets`` composes this (``resolve``, ``resolve_for_task``,
``release_pin``) and re-exports its public names.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import attrs
from psycopg_pool import AsyncConnectionPool

from trace_core import access, errors
from trace_core.access import Action, Caller, PinAcl, TaskCaller
from trace_core.commit import PartitionState, VersionState
from trace_core.token import CapabilityClaims
from trace_lite import sqlfile
from trace_lite.dataset_rows import PartitionRow, PinRow, ResolveRow, TaskOrgRow
from trace_lite.orgs import Orgs, first
from trace_lite.pg import fetch_as, transaction

Q = sqlfile.load("datasets.sql")

#: Default pin lease of a resolve (a reader's query must finish, or renew, within it).
DEFAULT_PIN_TTL_S = 300.0
#: The schema of dataset tables in the data database (created by data migration 0001).
DATA_SCHEMA = "data"


def table_name(dataset_version: str) -> str:
    """The Postgres data table of a version of a ``postgres`` dataset (UUID-named), qualified
    with ``DATA_SCHEMA``: ``data.dsv_{hex}``."""
    return f"{DATA_SCHEMA}.dsv_{uuid.UUID(dataset_version).hex}"


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


class DatasetResolver:
    """Resolve and pin datasets for readers; release pins. Org names are looked up through
    ``orgs``."""

    def __init__(self, pool: AsyncConnectionPool, orgs: Orgs) -> None:
        self.pool = pool
        self.orgs = orgs

    async def task_reader(self, claims: CapabilityClaims) -> tuple[TaskCaller, TaskOrgRow]:
        """A running task's reader identity (only the datasets its capability token grants) and
        its row's org, read from the task's row: a token whose ``org_id`` claim names another
        org is refused. Raises ``NotFound`` (no such task), ``Unauthenticated``."""
        async with transaction(self.pool) as cur:
            params = {"task_id": claims.task_id}
            task = first(await fetch_as(cur, TaskOrgRow, Q["task_org"], params))
        if task is None:
            raise errors.NotFound("no such task", field="task_id")
        if task.org_id != claims.org_id:
            raise errors.Unauthenticated("capability token: org_id is not the task's org")
        return TaskCaller.from_grants(task.org_id, claims.task_id, claims.grants), task

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
        caller, task = await self.task_reader(claims)
        staged = None
        if task.staged_dag_id is not None and task.staged_generation is not None:
            staged = (task.staged_dag_id, task.staged_generation)
        return await self.resolve(caller, task.org_name, names, pin_ttl_s=pin_ttl_s, staged=staged)

    async def resolve(
        self,
        caller: Caller,
        org: str,
        names: Sequence[str],
        *,
        pin_ttl_s: float = DEFAULT_PIN_TTL_S,
        include_objects: bool = True,
        staged: tuple[str, int] | None = None,
    ) -> Resolution:
        """Check read permission and pin each name to its active version, once (``staged``:
        ``(dag_id, generation)``, the datasets of that DAG through that staged pointer set).

        Every pointer is read in one statement (a whole pointer set, never a mix) and a pin
        lease row is written for each version (unless ``pin_ttl_s`` is 0) so it cannot be
        purged while the reader reads. Readers are handed promoted partitions only. Returns the
        pins and what to read. Raises ``NotFound`` (unknown name or org, or a caller of another
        org), ``Forbidden``.
        """
        if not names:
            raise errors.ValidationFailed("name at least one dataset", field="names")
        org_id = await self.orgs.org_id(org)
        if caller.org_id != org_id:
            raise errors.NotFound("no such dataset", field="names")
        for _ in range(3):
            pin_id = str(uuid.uuid4())
            try:
                rows, parts = await self._resolve_once(
                    caller, org_id, names, pin_id, pin_ttl_s, include_objects, staged
                )
            except _PurgedUnderUs:
                continue
            break
        else:  # pragma: no cover - three purges racing three resolves
            raise errors.Unavailable("versions were purged while resolving; retry")
        out = []
        for name in dict.fromkeys(names):
            r = rows[name]
            version = r.dataset_version
            mine = [p for p in parts if version and p.dataset_version == version]
            out.append(
                ResolvedDataset(
                    dataset=name,
                    dataset_uuid=r.dataset_uuid,
                    dataset_version=version,
                    storage_kind=r.storage_kind,
                    objects=[p.for_reader() for p in mine if p.state == PartitionState.PROMOTED],
                    table=table_name(version) if version and r.storage_kind != "parquet" else None,
                    pending=sum(p.state == PartitionState.COMMITTED for p in mine),
                    corrupt=sum(p.state == PartitionState.CORRUPT for p in mine),
                )
            )
        return Resolution(pin_id=pin_id, datasets=out)

    async def _resolve_once(
        self,
        caller: Caller,
        org_id: str,
        names: Sequence[str],
        pin_id: str,
        pin_ttl_s: float,
        include_objects: bool,
        staged: tuple[str, int] | None = None,
    ) -> tuple[dict[str, ResolveRow], list[PartitionRow]]:
        async with transaction(self.pool) as cur:
            params = {
                "staged_dag": staged[0] if staged else None,
                "staged_generation": staged[1] if staged else None,
                "org_id": org_id,
                "names": list(names),
                "pin_id": pin_id,
                "subject": access.pin_holder(caller),
                "ttl_s": pin_ttl_s,
            }
            rows = {r.name: r for r in await fetch_as(cur, ResolveRow, Q["resolve"], params)}
            for n, name in enumerate(names):
                row = rows.get(name)
                if row is None:
                    raise errors.NotFound(f"no such dataset {name!r}", field=f"names[{n}]")
                access.check(caller, row.acl(org_id), Action.READ)
            if any(r.version_state == VersionState.PURGED for r in rows.values()):
                raise _PurgedUnderUs()
            parquet = [
                r.dataset_version
                for r in rows.values()
                if r.dataset_version and r.storage_kind == "parquet"
            ]
            parts: list[PartitionRow] = []
            if include_objects and parquet:
                params = {"versions": parquet}
                parts = await fetch_as(cur, PartitionRow, Q["version_objects"], params)
        return rows, parts

    async def release_pin(self, caller: Caller | None, org: str, pin_id: str) -> None:
        """Release a reader's pin early: its holder or an admin of its org, through that org.

        Returns None. Raises ``NotFound`` (no such pin in ``org``, or a caller outside it),
        ``Forbidden`` (a member who neither holds the pin nor is an admin); nothing is
        deleted on a refusal."""
        org_id = await self.orgs.org_id(org)
        async with transaction(self.pool) as cur:
            rows = await fetch_as(cur, PinRow, Q["lock_pin"], {"pin_id": pin_id})
            pins = {PinAcl(org_id=r.org_id, holder=r.holder) for r in rows}
            if len(pins) != 1:
                raise errors.NotFound("no such pin", field="pin_id")
            (pin,) = pins
            if pin.org_id != org_id:
                raise errors.NotFound("no such pin", field="pin_id")
            if caller is not None:
                access.check_release(caller, pin)
            await cur.execute(Q["release_pin"], {"pin_id": pin_id})


class _PurgedUnderUs(errors.Retryable):
    """A version was purged between the pointer read and the pin; resolve again."""


__all__ = [
    "DATA_SCHEMA",
    "DEFAULT_PIN_TTL_S",
    "DatasetResolver",
    "Resolution",
    "ResolvedDataset",
    "table_name",
]
