"""Durable operator state on Postgres (``operator_state``, migration 0013).

One JSON document per ``(org_id, job_key, input_dataset_uuid)``. The key is derived from the
task row, never chosen by operator code: the task's org; its job (``{dag_id}/{job}`` for a DAG
task, the job's uuid, or ``key/{payload.state_key}`` for a task created without a job); and an
input dataset named in the task's org (or none). Only the task's running attempt may read or
write it, and a write is a compare-and-swap on the version read: two attempts racing on one
state cannot both win (the loser gets ``Conflict`` and its task retries on the new state).

Implements ``trace_sdk.ranges.StateStore`` and ``trace_sdk.follower.FollowerStore``.
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

import psycopg
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from trace_core import errors
from trace_lite import sqlfile
from trace_lite.pg import fetch_named, transaction

Q = sqlfile.load("operator_state.sql")


class _Scope(NamedTuple):
    org_id: str
    job_key: str | None
    input_dataset_uuid: str | None
    running: bool


class _State(NamedTuple):
    state: str
    version: int


class _Version(NamedTuple):
    version: int


class _WriterState(NamedTuple):
    state: str


class PgOperatorState:
    """``load``/``save`` of a task's operator state on the state database."""

    def __init__(self, pool: AsyncConnectionPool) -> None:
        self.pool = pool

    async def _scope(
        self, cur: psycopg.AsyncCursor[Any], task_id: str, attempt: int, input_dataset: str | None
    ) -> dict[str, Any]:
        rows = await fetch_named(
            cur,
            _Scope,
            Q["state_scope"],
            {"task_id": task_id, "attempt": attempt, "input_dataset": input_dataset},
        )
        if not rows:
            raise errors.NotFound("no such task")
        scope = rows[0]
        if not scope.running:
            raise errors.LeaseLost("the attempt is not the task's running one")
        if scope.job_key is None:
            raise errors.ValidationFailed(
                "operator state needs a job: a DAG task, a job's task or payload.state_key",
                field="payload.state_key",
            )
        if scope.input_dataset_uuid is None:
            raise errors.NotFound(f"no dataset {input_dataset!r} in the task's org")
        return {
            "org_id": scope.org_id,
            "job_key": scope.job_key,
            "input_dataset_uuid": scope.input_dataset_uuid,
        }

    async def load(
        self, task_id: str, attempt: int, input_dataset: str | None = None
    ) -> tuple[dict[str, Any] | None, int]:
        """The state document (None before the first save) and its version (0 then)."""
        async with transaction(self.pool) as cur:
            key = await self._scope(cur, task_id, attempt, input_dataset)
            rows = await fetch_named(cur, _State, Q["state_get"], key)
        if not rows:
            return None, 0
        doc: dict[str, Any] = json.loads(rows[0].state)
        return doc, rows[0].version

    async def save(
        self,
        task_id: str,
        attempt: int,
        state: dict[str, Any],
        version: int,
        input_dataset: str | None = None,
    ) -> int:
        """Write ``state`` over ``version`` (0: the first write); returns the new version.
        Raises ``Conflict`` when another writer moved the state first."""
        async with transaction(self.pool) as cur:
            key = await self._scope(cur, task_id, attempt, input_dataset)
            params = {**key, "state": Jsonb(state), "task_id": task_id, "version": version}
            query = Q["state_insert"] if version == 0 else Q["state_update"]
            rows = await fetch_named(cur, _Version, query, params)
        if not rows:
            raise errors.Conflict("the operator state changed since it was read")
        return rows[0].version

    async def writer_state(self, task_id: str, attempt: int, writer_task_id: str) -> str | None:
        """The lifecycle state of ``writer_task_id`` when it is a task of the same org and job
        as ``task_id`` (the state's last writer, ``trace_sdk.follower``); None otherwise. Only
        ``task_id``'s running attempt may ask (``LeaseLost``)."""
        async with transaction(self.pool) as cur:
            await self._scope(cur, task_id, attempt, None)
            params = {"task_id": task_id, "writer_task_id": writer_task_id}
            rows = await fetch_named(cur, _WriterState, Q["writer_state"], params)
        return rows[0].state if rows else None
