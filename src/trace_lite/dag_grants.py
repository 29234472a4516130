"""Read grants of DAG tasks: a task reads exactly its job's declared inputs its deployer may read.

A DAG task's capability token grants reads (``grants.datasets.read``, minted from
``tasks.read_datasets``) for the datasets its job's inputs declare -- ``from: {dataset: name}``
and ``from: {job, output}`` where that output is published as a dataset -- and only those the
subject that deployed the task's DAG version may read under ``trace_core.access`` (org admins,
deployers and triggerers of the producing DAG, members holding one of the dataset's
``read_roles``; DAG-to-DAG reads included). A declared input the deployer may not read is left
out of the grant: the task is still created, and a read of that dataset is refused.

The grant is computed when the task is created (``create_dag_tasks``: triggers, schedules,
fan-out), from the deployer's membership at that moment, and stored in ``read_datasets``; every
token of the task (claim, heartbeat) is minted from that row. A role revoked later applies to
tasks created after the revocation. Versions deployed by the platform (``created_by`` =
``PLATFORM``) read as an org admin does.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import attrs
import psycopg

from trace_core import access
from trace_core.access import DatasetAcl, UserCaller
from trace_lite import sqlfile
from trace_lite.pg import fetch_as

Q = sqlfile.load("dag_grants.sql")

#: The ``created_by`` of versions deployed (and activations made) by the platform itself.
PLATFORM = "platform"

#: A DAG job of one version: ``(dag_id, version, job)``.
JobKey = tuple[str, int, str]


@attrs.frozen
class InputDatasetRow:
    dag_id: str
    version: int
    job: str
    org_id: str
    name: str
    producer_dag_id: str
    read_roles: list[str]


@attrs.frozen
class DeployerRow:
    dag_id: str
    version: int
    org_id: str
    subject: str
    roles: list[str]
    dags: list[str]
    member: bool

    def caller(self) -> UserCaller:
        if self.subject == PLATFORM:
            return UserCaller(self.subject, self.org_id, frozenset({access.ADMIN_ROLE}))
        return UserCaller(
            self.subject, self.org_id, frozenset(self.roles), frozenset(self.dags), self.member
        )


async def read_grants(
    cur: psycopg.AsyncCursor[Any], jobs: Iterable[JobKey]
) -> dict[JobKey, tuple[str, ...]]:
    """The dataset names a task of each job in ``jobs`` may read (sorted; empty for a job
    without readable declared inputs), in the caller's transaction."""
    keys = sorted(set(jobs))
    if not keys:
        return {}
    params = {
        "dag_ids": [k[0] for k in keys],
        "versions": [k[1] for k in keys],
        "jobs": [k[2] for k in keys],
    }
    inputs = await fetch_as(cur, InputDatasetRow, Q["job_input_datasets"], params)
    deployers = {
        (d.dag_id, d.version): d.caller()
        for d in await fetch_as(cur, DeployerRow, Q["version_deployers"], params)
    }
    out: dict[JobKey, set[str]] = {k: set() for k in keys}
    for row in inputs:
        caller = deployers.get((row.dag_id, row.version))
        acl = DatasetAcl(row.org_id, row.name, row.producer_dag_id, frozenset(row.read_roles))
        if caller is not None and access.allowed(caller, acl, access.Action.READ):
            out[(row.dag_id, row.version, row.job)].add(row.name)
    return {k: tuple(sorted(v)) for k, v in out.items()}


__all__ = ["PLATFORM", "JobKey", "read_grants"]
