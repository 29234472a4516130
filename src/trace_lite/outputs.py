"""The output commit hook: an attempt's manifest becomes dataset partitions, in its completion.

``Dispatcher.complete_many`` calls ``prepare_outputs`` before the completion's transaction
(checks that need the ObjectStore) and ``apply_outputs`` inside it, between the lifecycle
decision and the fenced compare-and-swap. The kernel decides (``trace_core.commit``: what is
safe, what a manifest writes); this module reads the rows that decision needs and applies it.

Invariants kept here (``docs/architecture/data_versioning.md``, "The commit protocol"):

* a task of a DAG commits only to datasets its DAG produces (``datasets.dag_id``): a manifest
  naming another DAG's dataset is refused with ``Forbidden`` and nothing of it is committed.
  Tasks created through the admin API (``tasks.dag_id`` NULL: platform tooling, not a tenant
  surface) may commit to any dataset of their org;
* unsafe keys and keys outside *this* attempt's staging prefix are refused before any storage
  call; every object exists with the size and sha256 the manifest states;
* an attempt's outputs become partitions only inside its completion's transaction, fenced on
  ``(task_id, attempt, lease_token)``, in a savepoint (a refusal leaves the batch's other
  completions intact); partitions are written ``committed`` and become readable only once
  promotion has verified them (``trace_lite.dataset_gc``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import attrs
import psycopg
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from trace_core import commit, errors, wire
from trace_core.object_keys import is_within, staging_prefix, validate_key
from trace_core.ports import ObjectInfo, ObjectStore
from trace_lite import sqlfile
from trace_lite.pg import fetch_as, transaction

Q = sqlfile.load("outputs.sql")

#: Outbox topic of invalidations emitted by replace rewrites.
INVALIDATE_TOPIC = "dataset.invalidate"
_HEAD_CONCURRENCY = 64
#: Manifests longer than this are checked against one listing of the staging prefix.
_LIST_OVER = 32


@attrs.frozen
class PreparedOutputs:
    """A completion's manifest, checked against the ObjectStore before the transaction."""

    org_id: str
    entries: tuple[commit.ManifestEntry, ...]
    #: The DAG the task runs for; None for an admin-API task.
    dag_id: str | None = None
    #: The staged pointer set the task commits through (a rebuild, ``trace_lite.dag_remat``);
    #: None: the DAG's active one.
    staged_generation: int | None = None


@attrs.frozen
class TaskOrgRow:
    task_id: str
    org_id: str
    dag_id: str | None
    staged_generation: int | None


@attrs.frozen
class TargetRow:
    """Where a manifest's dataset name lands: its explicit or active version."""

    name: str
    #: The version the entry named (``None``: the active one).
    asked: str | None
    dataset_uuid: str
    #: The DAG that produces the dataset.
    producer_dag_id: str
    update_strategy: str
    dataset_version: str
    version_state: str

    def target(self, org_id: str) -> commit.Target:
        return commit.Target(
            org_id=org_id,
            dataset_uuid=self.dataset_uuid,
            update_strategy=commit.UpdateStrategy(self.update_strategy),
            dataset_version=self.dataset_version,
            version_state=commit.VersionState(self.version_state),
        )


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
        task_ids = [r.task_id for r in todo.values()]
        rows = await fetch_as(cur, TaskOrgRow, Q["task_orgs"], {"task_ids": task_ids})
    orgs = {r.task_id: r.org_id for r in rows}
    dags = {r.task_id: r.dag_id for r in rows}
    staged = {r.task_id: r.staged_generation for r in rows}
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
            out[i] = PreparedOutputs(org_id, tuple(entries), dags[r.task_id], staged[r.task_id])
        except errors.TraceError as exc:
            out[i] = exc
    return out


async def apply_outputs(
    cur: psycopg.AsyncCursor[Any], req: wire.CompleteRequest, prepared: PreparedOutputs
) -> commit.CommitPlan:
    """Record a checked manifest into its dataset versions, inside the completion's
    transaction (a savepoint: a refusal leaves the other completions of the batch intact).

    Returns the plan applied. Raises ``NotFound`` (unknown dataset in the org, or no active
    version and none named), ``Forbidden`` (a DAG task naming a dataset another DAG produces),
    ``Conflict`` (purged version, a concurrent commit of the same
    partition), ``ValidationFailed`` (see ``trace_core.commit.plan_commit``).
    """
    entries = prepared.entries
    try:
        async with cur.connection.transaction():
            params = {
                "org_id": prepared.org_id,
                "names": [e.dataset for e in entries],
                "versions": [e.version for e in entries],
                "dag_id": prepared.dag_id,
                "staged_generation": prepared.staged_generation,
            }
            found = {
                (t.name, t.asked): t
                for t in await fetch_as(cur, TargetRow, Q["commit_targets"], params)
            }
            targets: list[commit.Target] = []
            for n, e in enumerate(entries):
                row = found.get((e.dataset, e.version))
                if row is None:
                    raise errors.NotFound(
                        f"dataset {e.dataset!r} does not exist in this org or has no "
                        + ("such version" if e.version else "active version"),
                        field=f"outputs[{n}].dataset",
                    )
                if prepared.dag_id is not None and row.producer_dag_id != prepared.dag_id:
                    raise errors.Forbidden(
                        f"dataset {e.dataset!r} is produced by another DAG: a DAG's tasks "
                        "commit only to the datasets their DAG produces",
                        field=f"outputs[{n}].dataset",
                    )
                targets.append(row.target(prepared.org_id))
            ranges = [
                (e.start, e.end) for e in entries if e.start is not None and e.end is not None
            ]
            live = await fetch_as(
                cur,
                commit.LivePartition,
                Q["live_partitions"],
                {
                    "versions": sorted({t.dataset_version for t in targets}),
                    "min_start": min((s for s, _ in ranges), default=0),
                    "max_end": max((x for _, x in ranges), default=0),
                    "keys": [e.key for e in entries if e.key is not None],
                },
            )
            plan = commit.plan_commit(
                entries, targets, live, task_id=req.task_id, attempt=req.attempt
            )
            await _apply(cur, req, plan)
            return plan
    except psycopg.errors.UniqueViolation as exc:
        raise errors.Conflict("a concurrent commit wrote the same partition") from exc


async def _apply(
    cur: psycopg.AsyncCursor[Any], req: wire.CompleteRequest, plan: commit.CommitPlan
) -> None:
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
        await cur.execute(Q["notify_committed"])
    if plan.invalidations:
        payloads = [
            Jsonb({**attrs.asdict(inv), "task_id": req.task_id, "attempt": req.attempt})
            for inv in plan.invalidations
        ]
        await cur.execute(
            Q["insert_outbox_many"], {"topic": INVALIDATE_TOPIC, "payloads": payloads}
        )


__all__ = ["INVALIDATE_TOPIC", "PreparedOutputs", "apply_outputs", "prepare_outputs"]
