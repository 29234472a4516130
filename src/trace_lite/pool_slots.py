"""Worker-pool slots: a task of a pooled DAG job runs holding one slot of its pool.

A DAG job with ``worker_pool: NAME`` runs each attempt in one slot of that pool (``worker_pools``
of its version: each slot an ``env`` and a ``secret_env`` of secret names). The Dispatcher leases
a slot when it starts the attempt, in the claim's transaction (``lease_slots``); the slot is held
exactly while that attempt is running (``pool_slot_leases``, migration 0015): completion,
failure, timeout, cancel and lease expiry (the reaper) end the attempt and free its slot in
the same transaction, so a crashed worker's slot comes back when the reaper expires its lease
and none leaks. Effective concurrency of a job is ``min(max_concurrency, slots)``: a claim that
finds no free slot, or the job at its ``max_concurrency``, is refused as ``task_not_claimable``
(not claimable right now): the task stays queued and the worker drops its wake-up. The freed
slot wakes it: when an attempt holding a lease ends, a trigger (migration 0018) writes a
wake-up for the oldest queued task of each job of that DAG using the pool, in the transaction
that ended the attempt, so a waiting task is claimed as soon as a slot frees (a wake-up kept
and retried would reach the queue's ``max_receives`` while the pool is busy and be
dead-lettered). The re-wake pass (``rewake_after_s``) covers a lost one. Claims of one pool
serialize on a transaction-scoped advisory lock.

The claim answer (and ``fetch`` of the attempt) carries the slot's ``env`` and the NAMES of its
secrets (``wire.SlotOut``); the worker resolves them through the SecretStore for that attempt
only. Secret values are never stored in task rows, logged or put in errors.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import attrs
import psycopg

from trace_core import wire
from trace_lite import sqlfile
from trace_lite.pg import fetch_as

Q = sqlfile.load("pool_slots.sql")


@attrs.frozen
class PooledTaskRow:
    task_id: str
    dag_id: str
    dag_job: str
    pool: str
    #: The pool's slots as JSON text (``[{env?, secret_env?}]``); NULL for an unknown pool.
    slots: str | None
    max_concurrency: int | None


@attrs.frozen
class HeldRow:
    slot: int
    dag_job: str


@attrs.frozen
class SlotRow:
    pool: str
    index: int
    definition: str | None


def _slot_out(pool: str, index: int, definition: Any) -> wire.SlotOut:
    d = definition if isinstance(definition, dict) else {}
    return wire.SlotOut(
        pool=pool,
        index=index,
        env={str(k): str(v) for k, v in dict(d.get("env") or {}).items()},
        secret_env={str(k): str(v) for k, v in dict(d.get("secret_env") or {}).items()},
    )


async def lease_slots(
    cur: psycopg.AsyncCursor[Any], starts: Sequence[tuple[str, int]]
) -> tuple[dict[str, wire.SlotOut], dict[str, str]]:
    """Lease a slot for each attempt ``(task_id, attempt)`` about to start whose task's job
    uses a worker pool, in the claim's transaction. Returns the slots leased by task id, and
    the refused task ids with why (no free slot, or the job at its ``max_concurrency``).
    Attempts of jobs without a pool are in neither."""
    if not starts:
        return {}, {}
    attempts = dict(starts)
    rows = await fetch_as(cur, PooledTaskRow, Q["pooled_tasks"], {"task_ids": list(attempts)})
    leased: dict[str, wire.SlotOut] = {}
    refused: dict[str, str] = {}
    by_pool: dict[tuple[str, str], list[PooledTaskRow]] = {}
    for r in rows:
        by_pool.setdefault((r.dag_id, r.pool), []).append(r)
    for (dag_id, pool), tasks in sorted(by_pool.items()):  # one lock order: no deadlock
        params = {"dag_id": dag_id, "pool": pool}
        await cur.execute(Q["lock_pool"], params)
        held = await fetch_as(cur, HeldRow, Q["held_slots"], params)
        taken = {h.slot for h in held}
        per_job: dict[str, int] = {}
        for h in held:
            per_job[h.dag_job] = per_job.get(h.dag_job, 0) + 1
        for t in sorted(tasks, key=lambda t: t.task_id):
            slots = json.loads(t.slots) if t.slots else []
            limit = t.max_concurrency
            free = [i for i in range(len(slots)) if i not in taken]
            if limit is not None and per_job.get(t.dag_job, 0) >= limit:
                refused[t.task_id] = (
                    f"job {t.dag_job!r} runs at its max_concurrency ({limit}) right now; "
                    "the task stays queued"
                )
                continue
            if not free:
                refused[t.task_id] = (
                    f"no free slot in worker pool {pool!r} right now; the task stays queued"
                )
                continue
            slot = free[0]
            await cur.execute(
                Q["lease_slot"],
                {
                    **params,
                    "slot": slot,
                    "dag_job": t.dag_job,
                    "task_id": t.task_id,
                    "attempt": attempts[t.task_id],
                },
            )
            taken.add(slot)
            per_job[t.dag_job] = per_job.get(t.dag_job, 0) + 1
            leased[t.task_id] = _slot_out(pool, slot, slots[slot])
    return leased, refused


async def slot_of(cur: psycopg.AsyncCursor[Any], task_id: str, attempt: int) -> wire.SlotOut | None:
    """The slot attempt ``attempt`` of ``task_id`` leased (None: it leased none)."""
    params = {"task_id": task_id, "attempt": attempt}
    for r in await fetch_as(cur, SlotRow, Q["slot_of_attempt"], params):
        return _slot_out(r.pool, r.index, json.loads(r.definition) if r.definition else None)
    return None


__all__ = ["lease_slots", "slot_of"]
