"""The claim path: leasing queued tasks to new attempts, and the payload a worker fetches.

``TaskClaims`` locks claimable rows (``SKIP LOCKED``), asks the kernel for each decision
(``lifecycle.decide_claim``), leases the worker-pool slots pooled jobs need
(``trace_lite.pool_slots``) and applies every start as one compare-and-swap.

Invariant: a claim's commit and its answer agree. The whole answer -- each stored payload
parsed and held to the JSON limits, each capability token signed -- is built inside the claim's
transaction, so every committed claim is in the answer and a failure claims nothing. A payload
that no worker could be given fails its task (``decide_unservable``) instead of starting an
attempt nobody is told about.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import attrs
import psycopg
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from trace_core import errors, json_limits, lifecycle, wire
from trace_core.lifecycle import Fence, LeasePolicy, TaskState
from trace_core.object_keys import staging_prefix
from trace_lite.attempt_tokens import AttemptTokens
from trace_lite.pg import pg_array, transaction
from trace_lite.pool_slots import lease_slots, slot_of
from trace_lite.task_rows import ClaimRow, Q, TaskIdRow, fetch, stored_json, task_row

log = logging.getLogger("trace.dispatcher")


@attrs.frozen
class ClaimGrant:
    """A started attempt, as returned to an in-process claimer."""

    task_id: str
    attempt: int
    lease_token: str
    lease_expires_at: datetime
    org_id: str
    operator: str
    payload: dict[str, Any]
    timeout_s: int
    capability_token: str | None = None
    max_attempts: int = 0
    job_id: str | None = None
    #: Datasets the attempt may read (its token's ``grants.datasets.read``).
    read_datasets: tuple[str, ...] = ()
    #: The worker-pool slot the attempt leased (``trace_lite.pool_slots``).
    slot: wire.SlotOut | None = None

    @property
    def fence(self) -> Fence:
        return Fence(self.task_id, self.attempt, self.lease_token)


class TaskClaims:
    """Leases tasks to attempts and serves their payloads (see the module docstring)."""

    def __init__(
        self,
        pool: AsyncConnectionPool,
        *,
        claim_pool: AsyncConnectionPool,
        lease: LeasePolicy,
        tokens: AttemptTokens,
    ) -> None:
        self.pool = pool
        self.claim_pool = claim_pool
        self.lease = lease
        self.tokens = tokens

    async def claim(self, task_id: str, worker_id: str = "worker") -> wire.ClaimResponse:
        """Lease a queued task to a new attempt and mint its capability token.

        Raises ``NotFound``, ``TaskCanceled``, ``TaskNotClaimable`` (running under another
        lease, waiting for backoff, finished, or its payload cannot be served -- then it
        failed), ``Unavailable`` (the row is locked by another writer right now: retry later).
        One claim is a batch of one (``claim_many``).
        """
        batch = await self.claim_many([task_id], worker_id)
        if batch.refused:
            (refusal,) = batch.refused
            cls = errors.class_for_code(refusal.error) or errors.Conflict
            raise cls(refusal.message, field="task_id" if cls is errors.NotFound else None)
        (grant,) = batch.claims
        log.info("claimed", extra={"task_id": task_id, "attempt": grant.claim.attempt})
        return grant.claim

    async def claim_many(
        self, task_ids: Sequence[str], worker_id: str = "worker"
    ) -> wire.ClaimBatchResponse:
        """Claim several woken tasks in one transaction; each claim carries its task payload.

        Tasks that a single ``claim`` would refuse come back in ``refused`` with that error's
        code (``task_not_claimable``, ``task_canceled``, ``not_found``, or ``unavailable`` for
        a row another writer holds: keep its wake-up and retry). The answer, tokens included,
        is built before the transaction commits, so every committed claim is in it and a
        failure claims nothing. Raises ``Unavailable``.
        """
        ids = list(dict.fromkeys(task_ids))
        async with transaction(self.claim_pool) as cur:
            rows = await fetch(cur, ClaimRow, Q["lock_tasks_for_claim"], {"task_ids": ids})
            grants, refused = await self._start_attempts(cur, rows, worker_id)
            missing = set(ids) - {r.task_id for r in rows}
            if missing:
                found = await fetch(
                    cur, TaskIdRow, Q["existing_tasks"], {"task_ids": list(missing)}
                )
                exists = {r.task_id for r in found}
                for task_id in sorted(missing):
                    exc = (
                        errors.Unavailable("task is locked by another writer; retry later")
                        if task_id in exists
                        else errors.NotFound("no such task")
                    )
                    refused.append(wire.ClaimRefusal(task_id, exc.code, exc.message))
            claims = [_grant_out(await self._with_token(g), self.lease) for g in grants]
        return wire.ClaimBatchResponse(claims=claims, refused=refused)

    async def claim_next(
        self, n: int, worker_id: str = "inproc", *, mint_tokens: bool = False
    ) -> list[ClaimGrant]:
        """Lease up to ``n`` queued, due tasks (for trusted in-process workers).

        Returns the started attempts (capability tokens only when ``mint_tokens``), built
        before the transaction commits; a task whose payload cannot be served fails instead.
        """
        async with transaction(self.claim_pool) as cur:
            rows = await fetch(cur, ClaimRow, Q["lock_next_queued"], {"n": n})
            if not rows:
                return []
            grants, _refused = await self._start_attempts(cur, rows, worker_id)
            if mint_tokens:
                grants = [await self._with_token(g) for g in grants]
        return grants

    async def fetch(self, task_id: str, attempt: int | None = None) -> wire.TaskPayload:
        """The full task payload for a worker; ``staging_prefix`` is ``attempt``'s (default: the
        current attempt's). Raises ``NotFound``, ``Conflict`` for a stored payload that cannot
        be served."""
        async with transaction(self.pool) as cur:
            row = await task_row(cur, task_id)
            slot = await slot_of(cur, task_id, row.attempt if attempt is None else attempt)
        return wire.TaskPayload(
            task_id=row.task_id,
            org_id=row.org_id,
            job_id=row.job_id,
            operator=row.operator,
            payload=stored_json(row.payload, "payload") or {},
            status=row.state,
            attempt=row.attempt,
            max_attempts=row.max_attempts,
            timeout_s=row.timeout_s,
            staging_prefix=staging_prefix(
                row.org_id, row.task_id, row.attempt if attempt is None else attempt
            ),
            slot=slot,
        )

    async def _start_attempts(
        self, cur: psycopg.AsyncCursor[Any], rows: Sequence[ClaimRow], worker_id: str
    ) -> tuple[list[ClaimGrant], list[wire.ClaimRefusal]]:
        """Start an attempt for each claimable row, inside the claim's transaction, with the
        whole answer built before anything commits: a payload that cannot be served fails its
        task instead of starting an attempt nobody is told about (``decide_unservable``)."""
        starts: list[tuple[ClaimRow, lifecycle.ClaimDecision, dict[str, Any]]] = []
        refused: list[wire.ClaimRefusal] = []
        unservable: list[lifecycle.UnservableDecision] = []
        for row in rows:
            view = row.view
            try:
                decision = lifecycle.decide_claim(
                    view, now=row.now, lease=self.lease, new_lease_token=str(uuid.uuid4())
                )
            except errors.TraceError as exc:
                refused.append(wire.ClaimRefusal(view.task_id, exc.code, exc.message))
                continue
            try:
                payload = _servable_payload(row.payload)
            except errors.ValidationFailed as exc:
                reason = f"the task's payload cannot be served: {exc.message} at {exc.field}"
                unservable.append(lifecycle.decide_unservable(view, now=row.now, reason=reason))
                refusal = errors.TaskNotClaimable(f"{reason}; the task failed")
                refused.append(wire.ClaimRefusal(view.task_id, refusal.code, refusal.message))
                continue
            starts.append((row, decision, payload))
        if unservable:
            await cur.execute(
                Q["fail_unservable"],
                {
                    "task_ids": [d.task_id for d in unservable],
                    "states": [d.state.value for d in unservable],
                    "errors": [Jsonb(dict(d.error)) for d in unservable],
                    "finished_ats": [d.finished_at for d in unservable],
                },
            )
            for d in unservable:
                log.warning(
                    "task payload cannot be served; task failed",
                    extra={"task_id": d.task_id, "reason": d.error["message"]},
                )
        # a pooled job's attempt starts only holding a free slot of its pool
        slots, full = await lease_slots(cur, [(d.task_id, d.attempt) for _, d, _ in starts])
        for task_id, why in sorted(full.items()):  # a freed slot wakes it (migration 0018)
            busy = errors.TaskNotClaimable(f"{why}; a freed slot wakes the task")
            refused.append(wire.ClaimRefusal(task_id, busy.code, busy.message))
        starts = [s for s in starts if s[1].task_id not in full]
        if not starts:
            return [], refused
        await cur.execute(
            Q["apply_claims"],
            {
                "task_ids": pg_array([d.task_id for _, d, _ in starts]),
                "prev_attempts": pg_array([r.attempt for r, _, _ in starts]),
                "attempts": pg_array([d.attempt for _, d, _ in starts]),
                "lease_tokens": pg_array([d.lease_token for _, d, _ in starts]),
                "expires": pg_array([d.lease_expires_at for _, d, _ in starts]),
                "worker_id": worker_id,
            },
        )
        if cur.rowcount != len(starts):  # pragma: no cover - the rows are locked
            raise errors.Conflict("a task changed while being claimed")
        grants = [
            ClaimGrant(
                task_id=d.task_id,
                attempt=d.attempt,
                lease_token=d.lease_token,
                lease_expires_at=d.lease_expires_at,
                org_id=r.org_id,
                operator=r.operator,
                payload=payload,
                timeout_s=r.timeout_s,
                max_attempts=r.max_attempts,
                job_id=r.job_id,
                read_datasets=tuple(r.read_datasets or ()),
                slot=slots.get(d.task_id),
            )
            for r, d, payload in starts
        ]
        return grants, refused

    async def _with_token(self, grant: ClaimGrant) -> ClaimGrant:
        token = await self.tokens.mint(
            org_id=grant.org_id,
            task_id=grant.task_id,
            attempt=grant.attempt,
            timeout_s=grant.timeout_s,
            read_datasets=grant.read_datasets,
        )
        return attrs.evolve(grant, capability_token=token)


def _grant_out(g: ClaimGrant, lease: LeasePolicy) -> wire.ClaimGrantOut:
    assert g.capability_token is not None
    return wire.ClaimGrantOut(
        claim=wire.ClaimResponse(
            task_id=g.task_id,
            attempt=g.attempt,
            lease_token=g.lease_token,
            lease_expires_at=g.lease_expires_at.isoformat(),
            capability_token=g.capability_token,
            heartbeat_interval_s=lease.heartbeat_s,
        ),
        task=wire.TaskPayload(
            task_id=g.task_id,
            org_id=g.org_id,
            job_id=g.job_id,
            operator=g.operator,
            payload=g.payload,
            status=TaskState.RUNNING.value,
            attempt=g.attempt,
            max_attempts=g.max_attempts,
            timeout_s=g.timeout_s,
            staging_prefix=staging_prefix(g.org_id, g.task_id, g.attempt),
            slot=g.slot,
        ),
    )


#: Nesting past ``max_depth`` takes at least this many characters of JSON text.
_SHORTEST_TOO_DEEP = 2 * json_limits.DEFAULT_LIMITS.max_depth


def _servable_payload(text: str) -> dict[str, Any]:
    """A stored payload (JSON text, from jsonb: no NUL, lone surrogate or NaN can be in it) as
    the object a claim answers with. Raises ``ValidationFailed`` naming the field when no
    worker could be given it: over the JSON limits, e.g. nested 900 levels (written around the
    API, or before the limits existed), or not an object."""
    try:
        value = json.loads(text)
    except (RecursionError, ValueError):
        raise errors.ValidationFailed(
            "the payload cannot be parsed (nested too deep or too large)", field="payload"
        ) from None
    if len(text) > _SHORTEST_TOO_DEEP:  # a shorter text cannot nest past the limit
        json_limits.check(value, path="payload")
    if not isinstance(value, dict):
        raise errors.ValidationFailed("the payload is not an object", field="payload")
    return value


__all__ = ["ClaimGrant", "TaskClaims"]
