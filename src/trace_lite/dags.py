"""Deployed DAGs on Postgres: deploy a DAG file as an immutable version, list, show, diff.

A deploy (``Dags.deploy``) takes the plain document of a DAG file (what a YAML or JSON loader
returns) and, in one transaction:

1. validates it with ``trace_core.dag.validate`` against the operators this store was given
   and the org's registry (which DAG produces each dataset, multi-writer, schema): any problem
   refuses the whole deploy with ``ValidationFailed`` whose ``details.problems`` lists every
   one (``{path, message, hint, line}``) and nothing is written;
2. checks the caller may deploy (``trace_core.access.check_deploy``), under the DAG row's lock,
   so deploys of one DAG serialize;
3. diffs it against the active version (``trace_core.dag.diff`` / ``affected_jobs``);
4. abandons a building staging (``trace_lite.dag_remat``) unless the file is the staged one;
5. when its ``digest`` differs from the active version's: stores version N+1 (``dag_versions``,
   never updated), its jobs (``dag_jobs``) and input edges (``dag_inputs``), and then either
   makes it active at once -- registering each ``publish`` entry as a dataset produced by this
   DAG and job output (or, for a ``multi_writer`` dataset another DAG owns, as a writer of it:
   ``trace_lite.dag_registry``), giving each dataset it registered an empty first version in a new
   pointer set, and recording the activation (``dag_activations``, which
   ``trace_lite.dag_control`` rolls back) -- or, when the diff rebuilds jobs, **stages** it
   (``trace_lite.dag_remat.stage``: a staged pointer set and the rebuild's tasks; the cutover
   makes it active later). A deploy of the same meaning (same digest) stores nothing.

``dry_run=True`` answers the same diff and writes nothing. Running jobs is
``trace_lite.dag_runs``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import attrs
import psycopg
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from trace_core import access, errors
from trace_core.access import UserCaller
from trace_core.dag import (
    Dag,
    DatasetRef,
    JobRef,
    OperatorInfo,
    affected_jobs,
    diff,
    digest,
    parse,
    to_doc,
    validate,
)
from trace_lite import dag_remat, sqlfile
from trace_lite.dag_grants import PLATFORM
from trace_lite.dag_registry import VersionRow, register_published, registry_facts
from trace_lite.orgs import Orgs, first
from trace_lite.pg import fetch_as, transaction
from trace_lite.sink_tables import schema_change_problems
from trace_lite.task_rows import WakeMode

Q = sqlfile.load("dags.sql")
#: The registry's statements (versions, pointer sets), run inside a deploy's transaction.
DQ = sqlfile.load("datasets.sql")


@attrs.frozen
class DagRow:
    dag_id: str
    active_version: int | None
    active_generation: int | None


@attrs.frozen
class SubjectRow:
    subject: str


@attrs.frozen
class NextRow:
    version: int


@attrs.frozen
class UnpointedRow:
    dataset_uuid: str
    active_generation: int | None


@attrs.frozen
class NewVersionRow:
    dataset_version: str


@attrs.frozen
class GenerationRow:
    generation: int


@attrs.frozen
class ListedRow:
    name: str
    active_version: int | None
    digest: str | None
    created_by: str | None
    created_at: datetime | None


@attrs.frozen
class VersionInfoRow:
    version: int
    digest: str
    created_by: str
    created_at: datetime


@attrs.frozen
class PublishedRow:
    name: str
    job: str
    output: int
    dataset_uuid: str


@attrs.frozen
class Deployed:
    """What a deploy did (or, for a dry run, would do)."""

    dag: str
    #: The active version after the deploy (the new one when ``created``).
    version: int | None
    #: The version active before (None for a first deploy).
    previous_version: int | None
    #: Whether a new version was stored (False: same digest as the active one, or a dry run).
    created: bool
    digest: str
    #: ``trace_core.dag.Change`` as plain dicts, ``kind`` a string.
    changes: list[dict[str, Any]]
    #: The jobs a materialization-affecting change rebuilds (``trace_lite.dag_remat``).
    rebuild: list[str]
    dry_run: bool = False
    #: The version being rebuilt beside the active one (None: nothing staged; the new
    #: version, if any, went live at once).
    staged_version: int | None = None
    #: Tasks the staging's replay created.
    rebuild_tasks: int = 0
    #: A building staging this deploy abandoned: ``{version, canceled: {state: n}}``.
    abandoned: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


def _iso(ts: datetime | None) -> str | None:
    return ts.isoformat() if ts else None


def problems_error(problems: list[Any]) -> errors.ValidationFailed:
    """The error refusing a DAG document: ``field`` is the first problem's path and
    ``details.problems`` every problem, ``{path, message, hint, line}``."""
    first_problem = problems[0]
    return errors.ValidationFailed(
        f"the DAG has {len(problems)} problem(s); first: "
        f"{first_problem.path or '<top>'}: {first_problem.message}",
        field=first_problem.path,
        details={"problems": [attrs.asdict(p) for p in problems]},
    )


class Dags:
    """Deploy, list and show the DAGs of an org."""

    def __init__(
        self,
        pool: AsyncConnectionPool,
        *,
        operators: Mapping[str, OperatorInfo],
        orgs: Orgs | None = None,
        wake_mode: WakeMode = "queue",
    ) -> None:
        self.pool = pool
        #: The operators a deploy accepts, by name.
        self.operators = dict(operators)
        self.orgs = orgs or Orgs(pool)
        #: How the tasks a staging's replay creates are woken (the Dispatcher's mode).
        self.wake_mode: WakeMode = wake_mode

    async def user_caller(self, org: str, subject: str) -> UserCaller:
        """The user's membership in ``org`` (``Orgs.user_caller``). Raises ``NotFound``."""
        return await self.orgs.user_caller(org, subject)

    async def _spec(self, cur: psycopg.AsyncCursor[Any], dag_id: str, version: int) -> Dag:
        params = {"dag_id": dag_id, "version": version}
        (row,) = await fetch_as(cur, VersionRow, Q["version_spec"], params)
        return parse(json.loads(row.spec))

    async def deploy(
        self, caller: UserCaller | None, org: str, doc: object, *, dry_run: bool = False
    ) -> Deployed:
        """Deploy the DAG document ``doc`` to ``org`` (see the module docstring); with
        ``dry_run``, answer what it would do and write nothing.

        ``caller=None`` is the platform (tests, operator tooling). The caller's right to deploy
        is checked before the document is: a member who may not deploy learns nothing of its
        problems. Raises ``ValidationFailed`` (every problem in ``details.problems``),
        ``NotFound`` (no such org, or a caller outside it), ``Forbidden`` (not a deployer),
        ``Conflict`` (a published name another DAG took meanwhile), ``Unavailable``.
        """
        try:
            return await self._deploy(caller, org, doc, dry_run=dry_run)
        except _DryRun as done:
            return done.result

    async def _deploy(
        self, caller: UserCaller | None, org: str, doc: object, *, dry_run: bool
    ) -> Deployed:
        org_id = await self.orgs.org_id(org, create=caller is None)
        name = doc.get("name") if isinstance(doc, Mapping) else None
        async with transaction(self.pool) as cur:
            dag: DagRow | None = None
            params: dict[str, Any]
            if isinstance(name, str):
                params = {"org_id": org_id, "name": name}
                dag = first(await fetch_as(cur, DagRow, Q["lock_dag"], params))
            if caller is not None:
                deployers: list[SubjectRow] = []
                if dag is not None:
                    params = {"dag_id": dag.dag_id}
                    deployers = await fetch_as(cur, SubjectRow, Q["deployers"], params)
                access.check_deploy(caller, org_id, frozenset(r.subject for r in deployers))
            problems = validate(
                doc, operators=self.operators, datasets=await registry_facts(cur, org_id)
            )
            if problems:
                raise problems_error(problems)
            new = parse(doc)
            if problems := await schema_change_problems(cur, org_id, new):
                raise problems_error(problems)  # a buffered table cannot take the change
            if dag is None:
                await cur.execute(Q["ensure_dag"], {"org_id": org_id, "name": new.name})
                params = {"org_id": org_id, "name": new.name}
                (dag,) = await fetch_as(cur, DagRow, Q["lock_dag"], params)
            new_digest = digest(new)
            old: Dag | None = None
            old_digest = None
            if dag.active_version is not None:
                params = {"dag_id": dag.dag_id, "version": dag.active_version}
                (active,) = await fetch_as(cur, VersionRow, Q["version_spec"], params)
                old, old_digest = parse(json.loads(active.spec)), active.digest
            changes = diff(old, new) if old is not None else []
            rebuild = affected_jobs(new, changes) if old is not None else set(new.jobs)
            result = Deployed(
                dag=new.name,
                version=dag.active_version,
                previous_version=dag.active_version,
                created=False,
                digest=new_digest,
                changes=[{**attrs.asdict(c), "kind": c.kind.value} for c in changes],
                rebuild=sorted(rebuild),
                dry_run=dry_run,
            )
            if dry_run:
                raise _DryRun(result)  # rolls back the DAG row a first dry run inserted
            staging = await dag_remat.building(cur, dag.dag_id)
            if staging is not None:
                params = {"dag_id": dag.dag_id, "version": staging.version}
                (staged,) = await fetch_as(cur, VersionRow, Q["version_spec"], params)
                if staged.digest == new_digest:  # the file being rebuilt, again: keep building
                    return attrs.evolve(result, staged_version=staging.version)
            abandoned = await dag_remat.abandon(cur, dag.dag_id)
            result = attrs.evolve(result, abandoned=abandoned)
            if new_digest == old_digest:
                return result
            (nxt,) = await fetch_as(cur, NextRow, Q["next_version"], {"dag_id": dag.dag_id})
            created_by = caller.subject if caller is not None else PLATFORM
            await self._store(cur, dag.dag_id, nxt.version, new, new_digest, created_by)
            if caller is not None:
                await cur.execute(Q["add_deployer"], {"dag_id": dag.dag_id, "subject": created_by})
            if old is not None and dag.active_version is not None and rebuild:
                done = await dag_remat.stage(
                    cur,
                    org_id=org_id,
                    dag_id=dag.dag_id,
                    dag=new,
                    version=nxt.version,
                    from_version=dag.active_version,
                    active_generation=dag.active_generation,
                    rebuild=sorted(rebuild),
                    created_by=created_by,
                    wake_mode=self.wake_mode,
                )
                return attrs.evolve(
                    result, created=True, staged_version=nxt.version, rebuild_tasks=done.tasks
                )
            await cur.execute(Q["activate_version"], {"dag_id": dag.dag_id, "version": nxt.version})
            await register_published(cur, org_id, dag.dag_id, new)
            await self._first_versions(cur, dag.dag_id, created_by)
            params = {"dag_id": dag.dag_id, "created_by": created_by}
            await cur.execute(Q["record_deploy"], params)  # what a rollback steps back from
        return attrs.evolve(result, version=nxt.version, created=True)

    async def _store(
        self,
        cur: psycopg.AsyncCursor[Any],
        dag_id: str,
        version: int,
        dag: Dag,
        dag_digest: str,
        created_by: str,
    ) -> None:
        """Store version ``version`` of the DAG: its spec, jobs and input edges."""
        await cur.execute(
            Q["insert_version"],
            {
                "dag_id": dag_id,
                "version": version,
                "digest": dag_digest,
                "spec": Jsonb(to_doc(dag)),
                "created_by": created_by,
            },
        )
        jobs = list(dag.jobs.values())
        job_docs = to_doc(dag)["jobs"]
        await cur.execute(
            Q["insert_jobs"],
            {
                "dag_id": dag_id,
                "version": version,
                "jobs": [j.name for j in jobs],
                "operators": [j.operator for j in jobs],
                "runtimes": [j.runtime.value for j in jobs],
                "configs": [Jsonb(dict(j.config)) for j in jobs],
                "timeouts": [j.timeout_s for j in jobs],
                "max_attempts": [j.max_attempts for j in jobs],
                "triggers": [Jsonb(job_docs[j.name].get("triggers", [])) for j in jobs],
            },
        )
        edges = [(j.name, i, inp.source) for j in jobs for i, inp in enumerate(j.inputs)]
        await cur.execute(
            Q["insert_inputs"],
            {
                "dag_id": dag_id,
                "version": version,
                "jobs": [job for job, _, _ in edges],
                "indexes": [i for _, i, _ in edges],
                "from_jobs": [s.job if isinstance(s, JobRef) else None for _, _, s in edges],
                "from_outputs": [s.output if isinstance(s, JobRef) else None for _, _, s in edges],
                "from_datasets": [
                    s.dataset if isinstance(s, DatasetRef) else None for _, _, s in edges
                ],
                "wheres": [
                    Jsonb(job_docs[job]["inputs"][i].get("where", {})) for job, i, _ in edges
                ],
            },
        )

    async def _first_versions(
        self, cur: psycopg.AsyncCursor[Any], dag_id: str, created_by: str
    ) -> None:
        """Give each dataset this deploy registered an empty first version and cut the DAG's
        pointer set over to them (the registry's statements, in the deploy's transaction), so
        the DAG's tasks can commit to them at once. Datasets already pointed at keep their
        versions: rebuilding is not built."""
        rows = await fetch_as(cur, UnpointedRow, Q["datasets_without_version"], {"dag_id": dag_id})
        if not rows:
            return
        versions = []
        for r in rows:
            params = {"dataset_uuid": r.dataset_uuid}
            (v,) = await fetch_as(cur, NewVersionRow, DQ["insert_version"], params)
            versions.append(v.dataset_version)
        pointer_set = {
            "dag_id": dag_id,
            "expected": rows[0].active_generation,
            "created_by": created_by,
            "dataset_uuids": [r.dataset_uuid for r in rows],
            "versions": versions,
        }
        if not await fetch_as(cur, GenerationRow, DQ["insert_pointer_set"], pointer_set):
            raise errors.Conflict("the DAG's pointer set changed concurrently")

    # -- reading ------------------------------------------------------------------------------

    async def _readable_org(self, caller: UserCaller | None, org: str) -> str:
        org_id = await self.orgs.org_id(org)
        if caller is not None and (
            caller.org_id != org_id or (not caller.member and not caller.dags)
        ):
            raise errors.NotFound("no such org", field="org")
        return org_id

    async def _dag(self, cur: psycopg.AsyncCursor[Any], org_id: str, name: str) -> DagRow:
        row = first(await fetch_as(cur, DagRow, Q["dag"], {"org_id": org_id, "name": name}))
        if row is None:
            raise errors.NotFound("no such DAG", field="dag")
        return row

    async def list_dags(self, caller: UserCaller | None, org: str) -> list[dict[str, Any]]:
        """The org's DAGs with their active version (members of the org). Raises
        ``NotFound``."""
        org_id = await self._readable_org(caller, org)
        async with transaction(self.pool) as cur:
            rows = await fetch_as(cur, ListedRow, Q["list_dags"], {"org_id": org_id})
        return [
            {
                "name": r.name,
                "active_version": r.active_version,
                "digest": r.digest,
                "deployed_by": r.created_by,
                "deployed_at": _iso(r.created_at),
            }
            for r in rows
        ]

    async def show(self, caller: UserCaller | None, org: str, name: str) -> dict[str, Any]:
        """A DAG's active version: its spec (defaults written out), digest, and the datasets
        it publishes. Raises ``NotFound``."""
        org_id = await self._readable_org(caller, org)
        async with transaction(self.pool) as cur:
            dag = await self._dag(cur, org_id, name)
            published = await fetch_as(cur, PublishedRow, Q["published_by"], {"dag_id": dag.dag_id})
            active = None
            if dag.active_version is not None:
                params = {"dag_id": dag.dag_id, "version": dag.active_version}
                (active,) = await fetch_as(cur, VersionRow, Q["version_spec"], params)
        return {
            "name": name,
            "active_version": dag.active_version,
            "digest": active.digest if active else None,
            "deployed_by": active.created_by if active else None,
            "deployed_at": _iso(active.created_at) if active else None,
            "spec": json.loads(active.spec) if active else None,
            "datasets": [attrs.asdict(p) for p in published],
        }

    async def active_spec(self, caller: UserCaller | None, org: str, name: str) -> Dag | None:
        """The active version of DAG ``name`` as a ``Dag`` (None before the first deploy).
        Raises ``NotFound``."""
        org_id = await self._readable_org(caller, org)
        async with transaction(self.pool) as cur:
            dag = await self._dag(cur, org_id, name)
            if dag.active_version is None:
                return None
            return await self._spec(cur, dag.dag_id, dag.active_version)

    async def versions(
        self, caller: UserCaller | None, org: str, name: str
    ) -> list[dict[str, Any]]:
        """Every version of a DAG, newest first, with ``active`` on the active one. Raises
        ``NotFound``."""
        org_id = await self._readable_org(caller, org)
        async with transaction(self.pool) as cur:
            dag = await self._dag(cur, org_id, name)
            rows = await fetch_as(cur, VersionInfoRow, Q["list_versions"], {"dag_id": dag.dag_id})
        return [
            {
                "version": r.version,
                "digest": r.digest,
                "created_by": r.created_by,
                "created_at": _iso(r.created_at),
                "active": r.version == dag.active_version,
            }
            for r in rows
        ]


class _DryRun(Exception):
    """Ends a dry run's transaction by rolling it back, carrying what the deploy would do."""

    def __init__(self, result: Deployed) -> None:
        super().__init__("dry run")
        self.result = result


__all__ = ["PLATFORM", "Dags", "Deployed", "problems_error"]
