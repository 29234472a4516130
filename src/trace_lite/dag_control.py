"""Controlling deployed DAGs on Postgres: rollback, cancel a run or a version, status.

* **Rollback** (``DagControl.rollback``) restores, in one transaction, the version *and* the
  dataset pointer set that were live before the current activation (``dag_activations``,
  migration 0014: a deploy records the version it made active with the pointer set it went live
  with; a rollback records the pair it restored, stepping back to what that pair stepped back
  to, so repeated rollbacks walk back through the deploys). In the same transaction every task
  of the rolled-back version in a state the kernel may cancel (``lifecycle.TRANSITIONS``) is
  canceled: queued and pending work never starts, and a running attempt learns it at its next
  heartbeat or completion (``TaskCanceled``), as for a single cancel. The DAG row stays locked
  for the whole transaction, and DAG task creation (``dag_runs.create_dag_tasks``) locks it
  ``FOR SHARE`` and refuses a version that is no longer active, so no task of the rolled-back
  version is created once the rollback commits. Readers resolve the active pointer set in one
  statement (``Datasets.resolve``): they see the whole old set or the whole restored one.
* **Cancel** a DAG run (``cancel_run``: the source task named by its run id, ``{dag}:{job}:
  {run_id}``, and every task of the same DAG created from its events, transitively through
  ``task_inputs``) or a whole version (``cancel_version``), one transaction each.
* **Status** (``status``): the active version and pointer set, each job's task counts by state,
  and the unfinished tasks of other versions.

Rollback and cancels are for the DAG's deployers (``trace_core.access.check_deploy``: org
admins, ``dag_deployer`` members, the DAG's deployers); a run may also be canceled by those who
may trigger it (``check_trigger``). Status is for members of the org and holders of a DAG grant.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Final

import attrs
import psycopg
from psycopg_pool import AsyncConnectionPool

from trace_core import access, errors
from trace_core.access import UserCaller
from trace_core.lifecycle import TERMINAL_STATES, TRANSITIONS, TaskEvent, TaskState
from trace_lite import dag_remat, sqlfile
from trace_lite.dag_registry import register_version
from trace_lite.orgs import Orgs, first
from trace_lite.pg import fetch_as, transaction

Q = sqlfile.load("dag_control.sql")


#: The states a cancel moves to ``canceled``, as the kernel's transition table says.
CANCELABLE: Final = tuple(
    sorted(s.value for (s, e), target in TRANSITIONS.items() if e is TaskEvent.CANCEL)
)
_TERMINAL: Final = sorted(s.value for s in TERMINAL_STATES)

#: The ``created_by`` of activations made by the platform itself (``caller=None``).
PLATFORM = "platform"


@attrs.frozen
class DagRow:
    dag_id: str
    active_version: int | None
    active_generation: int | None


@attrs.frozen
class SubjectRow:
    subject: str


@attrs.frozen
class ActivationRow:
    seq: int
    version: int
    generation: int | None
    previous_seq: int | None


@attrs.frozen
class TargetRow:
    seq: int
    version: int
    generation: int | None
    previous_seq: int | None
    names_purged: bool


@attrs.frozen
class VersionRow:
    active_version: int


@attrs.frozen
class SeqRow:
    seq: int


@attrs.frozen
class WasRow:
    was: str


@attrs.frozen
class TaskIdRow:
    task_id: str


@attrs.frozen
class ExistsRow:
    version: int


@attrs.frozen
class CountRow:
    job: str
    state: str | None
    n: int


@attrs.frozen
class VersionCountRow:
    version: int
    state: str
    n: int


@attrs.frozen
class RolledBack:
    """What a rollback did."""

    dag: str
    #: The version active before the rollback (its work canceled).
    from_version: int
    #: The version active now.
    version: int
    #: The pointer set (generation) active now; None when that version published nothing.
    generation: int | None
    #: Canceled tasks of ``from_version`` by the state they were in.
    canceled: dict[str, int]
    #: ``from_version`` was a staged version being rebuilt, abandoned (the active pair did not
    #: move; ``trace_lite.dag_remat``).
    abandoned: bool = False

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


def _by_state(rows: list[WasRow]) -> dict[str, int]:
    return dict(sorted(Counter(r.was for r in rows).items()))


class DagControl:
    """Rollback, cancels and status of the DAGs of one Postgres state database."""

    def __init__(self, pool: AsyncConnectionPool, *, orgs: Orgs | None = None) -> None:
        self.pool = pool
        self.orgs = orgs or Orgs(pool)

    async def _lock(
        self, cur: psycopg.AsyncCursor[Any], caller: UserCaller | None, org_id: str, name: str
    ) -> DagRow:
        """The DAG row, locked, after checking the caller may deploy it (before telling whether
        the DAG exists). A caller outside the org learns nothing of it (404 on the org)."""
        params = {"org_id": org_id, "name": name}
        dag = first(await fetch_as(cur, DagRow, Q["lock_dag"], params))
        deployers: list[SubjectRow] = []
        if dag is not None:
            deployers = await fetch_as(cur, SubjectRow, Q["deployers"], {"dag_id": dag.dag_id})
        if caller is not None:
            access.check_deploy(caller, org_id, frozenset(r.subject for r in deployers))
        if dag is None:
            raise errors.NotFound("no such DAG", field="dag")
        return dag

    async def rollback(self, caller: UserCaller | None, org: str, name: str) -> RolledBack:
        """Restore the previous version of DAG ``name`` and its pointer set, and cancel the
        rolled-back version's work, in one transaction (see the module docstring).

        ``caller=None`` is the platform. Raises ``NotFound`` (org, DAG), ``Forbidden`` (not a
        deployer), ``Conflict`` (nothing to roll back to; the previous pointer set names a
        purged dataset version; the restored version publishes a dataset the registry no longer
        lets it publish, e.g. another DAG now produces it), ``Unavailable``.
        """
        org_id = await self.orgs.org_id(org)
        created_by = caller.subject if caller is not None else PLATFORM
        async with transaction(self.pool) as cur:
            dag = await self._lock(cur, caller, org_id, name)
            abandoned = await dag_remat.abandon(cur, dag.dag_id)
            if abandoned is not None and dag.active_version is not None:
                # the deploy being rebuilt is what is rolled back: the active pair stays
                return RolledBack(
                    dag=name,
                    from_version=abandoned["version"],
                    version=dag.active_version,
                    generation=dag.active_generation,
                    canceled=abandoned["canceled"],
                    abandoned=True,
                )
            params: dict[str, Any] = {"dag_id": dag.dag_id}
            current = first(await fetch_as(cur, ActivationRow, Q["current_activation"], params))
            if current is None or current.previous_seq is None or dag.active_version is None:
                raise errors.Conflict(f"DAG {name!r} has no previous version to roll back to")
            params = {"dag_id": dag.dag_id, "seq": current.previous_seq}
            (target,) = await fetch_as(cur, TargetRow, Q["activation"], params)
            if target.names_purged:
                raise errors.Conflict(
                    f"the pointer set of version {target.version} names a purged dataset version"
                )
            params = {
                "dag_id": dag.dag_id,
                "version": target.version,
                "generation": target.generation,
                "expected_version": dag.active_version,
                "expected_generation": dag.active_generation,
            }
            if not await fetch_as(cur, VersionRow, Q["restore"], params):
                raise errors.Conflict("the DAG changed concurrently")  # pragma: no cover
            # the registry as the restored version publishes: its datasets' job/output and
            # schema, and its writer rows of other DAGs' multi_writer datasets (ADR 0037)
            await register_version(cur, org_id, dag.dag_id, target.version)
            params = {
                "dag_id": dag.dag_id,
                "version": target.version,
                "generation": target.generation,
                "previous_seq": target.previous_seq,
                "created_by": created_by,
            }
            await cur.execute(Q["record_rollback"], params)
            canceled: list[WasRow] = []
            if dag.active_version != target.version:
                params = {
                    "dag_id": dag.dag_id,
                    "version": dag.active_version,
                    "states": list(CANCELABLE),
                }
                canceled = await fetch_as(cur, WasRow, Q["cancel_version_tasks"], params)
        return RolledBack(
            dag=name,
            from_version=dag.active_version,
            version=target.version,
            generation=target.generation,
            canceled=_by_state(canceled),
        )

    async def cancel_version(
        self, caller: UserCaller | None, org: str, name: str, version: int
    ) -> dict[str, Any]:
        """Cancel every unfinished task of version ``version`` of DAG ``name`` in one
        transaction. Returns ``{dag, version, canceled: {state: n}}``. Canceling again cancels
        nothing. Raises ``NotFound`` (org, DAG, version), ``Forbidden`` (not a deployer)."""
        org_id = await self.orgs.org_id(org)
        async with transaction(self.pool) as cur:
            dag = await self._lock(cur, caller, org_id, name)
            params: dict[str, Any] = {"dag_id": dag.dag_id, "version": version}
            if not await fetch_as(cur, ExistsRow, Q["version_exists"], params):
                raise errors.NotFound(f"DAG {name!r} has no version {version}", field="version")
            params["states"] = list(CANCELABLE)
            canceled = await fetch_as(cur, WasRow, Q["cancel_version_tasks"], params)
        return {"dag": name, "version": version, "canceled": _by_state(canceled)}

    async def cancel_run(
        self, caller: UserCaller | None, org: str, name: str, run_id: str
    ) -> dict[str, Any]:
        """Cancel the unfinished tasks of run ``run_id`` of DAG ``name`` (its source task and
        every task of the DAG created from its events, transitively) in one transaction.
        Returns ``{dag, run_id, tasks, canceled: {state: n}}``. Raises ``NotFound`` (org, DAG,
        run), ``Forbidden`` (neither a deployer nor a triggerer of the DAG)."""
        org_id = await self.orgs.org_id(org)
        if caller is not None and (
            caller.org_id != org_id or (not caller.member and not caller.dags)
        ):
            raise errors.NotFound("no such org", field="org")
        async with transaction(self.pool) as cur:
            params: dict[str, Any] = {"org_id": org_id, "name": name}
            dag = first(await fetch_as(cur, DagRow, Q["dag"], params))
            if dag is None:
                raise errors.NotFound("no such DAG", field="dag")
            if caller is not None:
                access.check_trigger(caller, org_id, dag.dag_id)
            params = {"dag_id": dag.dag_id, "run_id": run_id}
            tasks = await fetch_as(cur, TaskIdRow, Q["run_tasks"], params)
            if not tasks:
                raise errors.NotFound(f"DAG {name!r} has no run {run_id!r}", field="run_id")
            params = {"task_ids": [t.task_id for t in tasks], "states": list(CANCELABLE)}
            canceled = await fetch_as(cur, WasRow, Q["cancel_tasks"], params)
        return {"dag": name, "run_id": run_id, "tasks": len(tasks), "canceled": _by_state(canceled)}

    async def status(self, caller: UserCaller | None, org: str, name: str) -> dict[str, Any]:
        """DAG ``name``'s active version and pointer set, each job's task counts by state
        (``{job: {state: n}}``, every state listed), and the unfinished tasks of its other
        versions (``{version: {state: n}}``). Raises ``NotFound``."""
        org_id = await self.orgs.org_id(org)
        if caller is not None and (
            caller.org_id != org_id or (not caller.member and not caller.dags)
        ):
            raise errors.NotFound("no such org", field="org")
        async with transaction(self.pool) as cur:
            params: dict[str, Any] = {"org_id": org_id, "name": name}
            dag = first(await fetch_as(cur, DagRow, Q["dag"], params))
            if dag is None:
                raise errors.NotFound("no such DAG", field="dag")
            jobs: dict[str, dict[str, int]] = {}
            others: dict[str, dict[str, int]] = {}
            staging = await dag_remat.status(cur, dag.dag_id)
            if dag.active_version is not None:
                params = {"dag_id": dag.dag_id, "version": dag.active_version}
                for r in await fetch_as(cur, CountRow, Q["job_counts"], params):
                    counts = jobs.setdefault(r.job, {s.value: 0 for s in TaskState})
                    if r.state is not None:
                        counts[r.state] = r.n
                params["terminal"] = _TERMINAL
                for v in await fetch_as(cur, VersionCountRow, Q["unfinished_by_version"], params):
                    others.setdefault(str(v.version), {})[v.state] = v.n
        return {
            "dag": name,
            "active_version": dag.active_version,
            "active_generation": dag.active_generation,
            "jobs": jobs,
            "other_versions": others,
            "rebuilding": staging,
        }


__all__ = ["CANCELABLE", "DagControl", "RolledBack"]
