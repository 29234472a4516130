"""The Dispatcher: the kernel's task lifecycle decisions applied to Postgres state.

It is a library object first: the aiohttp servers are thin adapters over it, and trusted
in-process workers (tests, benchmarks, embedders) call it directly.

Every operation is one transaction that (1) locks the rows it needs and reads the database's
``now()``, (2) asks ``trace_core.lifecycle`` for a decision, (3) applies the decision as a
compare-and-swap on ``(task_id, attempt, lease_token)`` together with the outbox rows that
announce it. Zero rows affected means someone else moved the state on: a domain ``Conflict``.

Invariants kept here (on top of the kernel's):

* a claim's commit and its answer agree: the whole answer (payload parsed and checked, tokens
  signed) is built before the claim commits, so every committed claim is in the answer and a
  failure claims nothing;
* one completion of a group commit never changes another's outcome (``complete_many``);
* nothing a capability token says is taken on trust: ``check_claims`` checks every claim
  against the task row.

The time-driven half lives in ``trace_lite.reaper``, the outbox publisher in
``trace_lite.outbox_publisher``; the Dispatcher composes both and runs their loops
(``run_background``). Postgres is the state store in both profiles (RDS in AWS), so this
module is shared by them; only the Queue, ObjectStore and Signer differ.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import random
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

import attrs
import psycopg
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from trace_core import errors, json_limits, lifecycle, wire
from trace_core import outbox as outbox_sm
from trace_core.lifecycle import Fence, LeasePolicy, Op, Outcome, RetryPolicy, TaskState
from trace_core.object_keys import is_within, staging_prefix, validate_key
from trace_core.ports import ObjectStore, Queue, Signer
from trace_core.sink import inline_lines
from trace_core.token import (
    CapabilityClaims,
    TokenPolicy,
    check_binding,
    issue_claims,
    subject_for,
)
from trace_lite.capabilities import TokenIssuer, TokenVerifier
from trace_lite.outbox_publisher import Launcher, OutboxPublisher
from trace_lite.outputs import apply_outputs, prepare_outputs
from trace_lite.pg import pg_array, transaction
from trace_lite.pool_slots import lease_slots, slot_of
from trace_lite.reaper import Reaper, ReapReport
from trace_lite.task_orgs import TaskOrgs
from trace_lite.task_rows import (
    AttemptRow,
    BufferBatchRow,
    ClaimRow,
    CountRow,
    CreatedRow,
    EventKeyRow,
    EventRow,
    LockedTask,
    Q,
    TaskIdRow,
    TaskRow,
    WakeMode,
    fetch,
    inspectable,
    jsonable,
    lock_task,
    stored_json,
    wake,
)
from trace_sdk.aio import run_every

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


def _grant_out(g: ClaimGrant, lease: LeasePolicy) -> wire.ClaimGrantOut:
    assert g.capability_token is not None
    return wire.ClaimGrantOut(
        claim=wire.ClaimResponse(
            task_id=g.task_id,
            attempt=g.attempt,
            lease_token=g.lease_token,
            lease_expires_at=_iso(g.lease_expires_at),
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


def _check_completion(req: wire.CompleteRequest) -> None:
    """Refuse a completion that could fail in SQL, before it shares a transaction with others.

    Raises ``ValidationFailed`` naming the field: a value jsonb cannot store or over the JSON
    limits (``trace_core.json_limits``), or an event key repeated in one call.
    """
    if req.result is not None:
        json_limits.check(req.result, path="result")
    if req.error is not None:
        json_limits.check(req.error, path="error")
    keys: set[str] = set()
    for j, event in enumerate(req.final_events):
        if event.key in keys:
            raise errors.ValidationFailed(
                "event keys must be unique in one call", field=f"final_events[{j}].key"
            )
        keys.add(event.key)
        json_limits.check(event.payload, path=f"final_events[{j}].payload")
    if req.outputs:
        json_limits.check(wire.unstructure(req.outputs), path="outputs")


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


def _is_canonical_uuid(value: str) -> bool:
    try:
        return str(uuid.UUID(value)) == value
    except ValueError:
        return False


def _iso(ts: datetime) -> str:
    return ts.isoformat()


class Dispatcher:
    """Creates, leases, fences and finishes tasks on Postgres state.

    ``wake_mode="queue"`` wakes remote workers through the outbox and ``queue``;
    ``"notify"`` only sends ``NOTIFY trace_tasks`` for in-process claimers (no outbox rows).
    """

    def __init__(
        self,
        pool: AsyncConnectionPool,
        *,
        signer: Signer,
        queue: Queue | None = None,
        object_store: ObjectStore | None = None,
        lease: LeasePolicy = LeasePolicy(),
        retry: RetryPolicy = RetryPolicy(),
        token_policy: TokenPolicy = TokenPolicy(),
        outbox_policy: outbox_sm.OutboxPolicy = outbox_sm.OutboxPolicy(),
        wake_mode: WakeMode = "queue",
        rand: Callable[[], float] = random.random,
        clock_epoch: Callable[[], float] | None = None,
        rewake_after_s: float = 120.0,
        claim_pool: AsyncConnectionPool | None = None,
    ) -> None:
        self.pool = pool
        #: Claims run on this pool: its sessions carry the claim path's 5 s statement timeout
        #: (``open_pool(role="claim")``); defaults to ``pool``.
        self.claim_pool = claim_pool or pool
        self.signer = signer
        self.queue = queue
        self.object_store = object_store
        self.lease = lease
        self.retry = retry
        self.token_policy = token_policy
        self.outbox_policy = outbox_policy
        self.wake_mode: WakeMode = wake_mode
        self._rand = rand
        self.verifier = TokenVerifier(signer, token_policy)
        self.issuer = TokenIssuer(signer)
        self.orgs = TaskOrgs(pool)
        self._clock_epoch = clock_epoch
        self.reaper = Reaper(
            pool, retry=retry, wake_mode=wake_mode, rewake_after_s=rewake_after_s, rand=rand
        )
        self.outbox = OutboxPublisher(pool, queue=queue, policy=outbox_policy, rand=rand)

    @property
    def launcher(self) -> Launcher | None:
        """Launches ``runtime: lambda`` tasks; set by the AWS profile (``None`` in Lite)."""
        return self.outbox.launcher

    @launcher.setter
    def launcher(self, launcher: Launcher | None) -> None:
        self.outbox.launcher = launcher

    @property
    def rewake_after_s(self) -> float:
        """A queued task unclaimed this long gets a fresh wake-up (its last one was lost)."""
        return self.reaper.rewake_after_s

    @rewake_after_s.setter
    def rewake_after_s(self, seconds: float) -> None:
        self.reaper.rewake_after_s = seconds

    # -- plumbing ---------------------------------------------------------------------------

    def _tx(
        self, *, claim: bool = False
    ) -> contextlib.AbstractAsyncContextManager[psycopg.AsyncCursor[Any]]:
        return transaction(self.claim_pool if claim else self.pool)

    async def _mint(
        self,
        *,
        org_id: str,
        task_id: str,
        attempt: int,
        timeout_s: int,
        read_datasets: Sequence[str] = (),
    ) -> str:
        now = int(self._clock_epoch() if self._clock_epoch else time.time())
        claims = issue_claims(
            self.token_policy,
            org_id=org_id,
            task_id=task_id,
            attempt=attempt,
            attempt_timeout_s=timeout_s,
            now_epoch=now,
            jti=uuid.uuid4().hex,
            grants={"datasets": {"read": list(read_datasets)}} if read_datasets else None,
        )
        token = await self.issuer.encode(claims)
        self.verifier.remember(token, claims)
        self.orgs.remember(task_id, org_id)
        return token

    # -- admin ------------------------------------------------------------------------------

    async def create_tasks(self, requests: Sequence[wire.CreateTaskRequest]) -> list[wire.TaskInfo]:
        """Create tasks (queued, or pending when delayed) and wake workers in one transaction.

        A request whose ``idempotency_key`` already exists in its org returns the existing task
        with ``created=False``. Raises ``ValidationFailed`` for a payload over the JSON limits
        (``trace_core.json_limits``), ``Unavailable``.
        """
        for i, r in enumerate(requests):
            json_limits.check(r.payload, path=f"tasks[{i}].payload")
        async with self._tx() as cur:
            org_ids = [await self.orgs.org_id(cur, r.org) for r in requests]
            task_ids = [str(uuid.uuid4()) for _ in requests]
            params = {
                "task_ids": task_ids,
                "org_ids": org_ids,
                "operators": [r.operator for r in requests],
                "payloads": [Jsonb(r.payload) for r in requests],
                "states": [lifecycle.decide_create(delay_s=r.delay_s).value for r in requests],
                "max_attempts": [r.max_attempts for r in requests],
                "timeouts": [r.timeout_s for r in requests],
                "delays": [r.delay_s for r in requests],
                "idempotency_keys": [r.idempotency_key for r in requests],
                "runtimes": [r.runtime for r in requests],
                "read_datasets": [Jsonb(r.read_datasets) for r in requests],
            }
            rows = await fetch(cur, CreatedRow, Q["insert_tasks"], params)
            created = {r.task_id: _info(r) for r in rows}
            await wake(
                cur,
                [t.task_id for t in created.values() if t.state == TaskState.QUEUED],
                self.wake_mode,
            )
            if len(created) == len(requests):
                return [created[t] for t in task_ids]
            # Some were idempotent repeats: answer with the existing tasks, in request order.
            keyed = [
                (o, r.idempotency_key)
                for o, r in zip(org_ids, requests, strict=True)
                if r.idempotency_key is not None
            ]
            found = await fetch(
                cur,
                CreatedRow,
                Q["tasks_by_idempotency_key"],
                {"org_ids": [o for o, _ in keyed], "idempotency_keys": [k for _, k in keyed]},
            )
            existing = {(r.org_id, r.idempotency_key): r for r in found}
            return [
                created[tid]
                if tid in created
                else _info(existing[(org_id, r.idempotency_key)], created=False)
                for tid, org_id, r in zip(task_ids, org_ids, requests, strict=True)
            ]

    async def cancel(self, task_id: str) -> wire.TaskInfo:
        """Cancel a task; canceling a canceled task is a no-op.

        A running attempt learns it at its next heartbeat or completion (``TaskCanceled``).
        Raises ``NotFound``, ``Conflict`` for a completed or failed task.
        """
        async with self._tx() as cur:
            task = (await lock_task(cur, task_id)).view
            target = lifecycle.decide_cancel(task)
            if target is not None:
                await cur.execute(
                    Q["apply_cancel"], {"task_id": task_id, "expected_state": task.state.value}
                )
                if cur.rowcount != 1:
                    raise errors.Conflict("task changed while canceling")
            row = await _task_row(cur, task_id)
        return wire.TaskInfo(
            row.task_id, row.org_id, row.operator, row.state, row.attempt, row.max_attempts
        )

    async def get_task(self, task_id: str) -> dict[str, Any]:
        """The task with its attempts and events, for inspection; a stored JSON value that
        cannot be served shows as ``{"unservable": <why>}``. Raises ``NotFound``."""
        async with self._tx() as cur:
            row = await _task_row(cur, task_id)
            attempts = await fetch(cur, AttemptRow, Q["task_attempts"], {"task_id": task_id})
            events = await fetch(cur, EventRow, Q["task_events"], {"task_id": task_id})
        task: dict[str, Any] = row._asdict()
        for name in ("payload", "result", "error"):
            task[name] = inspectable(task[name])
        task["attempts"] = [{**a._asdict(), "error": inspectable(a.error)} for a in attempts]
        task["events"] = [{**e._asdict(), "payload": inspectable(e.payload)} for e in events]
        return dict(jsonable(task))

    async def counts(self) -> dict[str, int]:
        """Tasks per state."""
        async with self._tx() as cur:
            return {r.state: r.n for r in await fetch(cur, CountRow, Q["task_counts"], {})}

    async def outbox_counts(self) -> dict[str, int]:
        """Outbox rows per state."""
        async with self._tx() as cur:
            return {r.state: r.n for r in await fetch(cur, CountRow, Q["outbox_counts"], {})}

    # -- claim / fetch ----------------------------------------------------------------------

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
        token = await self._mint(
            org_id=grant.org_id,
            task_id=grant.task_id,
            attempt=grant.attempt,
            timeout_s=grant.timeout_s,
            read_datasets=grant.read_datasets,
        )
        return attrs.evolve(grant, capability_token=token)

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
        async with self._tx(claim=True) as cur:
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
        async with self._tx(claim=True) as cur:
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
        async with self._tx() as cur:
            row = await _task_row(cur, task_id)
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

    # -- capability tokens ------------------------------------------------------------------

    async def authorize(self, token: str | None, task_id: str, attempt: int) -> CapabilityClaims:
        """Verify a capability token, bind it to ``(task_id, attempt)`` and check its claims
        against the task row (``check_claims``).

        Raises ``Unauthenticated`` (missing, malformed, bad signature, unknown key, expired,
        claims that do not match the task), ``Forbidden`` (another task or attempt).
        """
        if not token:
            raise errors.Unauthenticated("missing X-Trace-Task-Capability")
        now = int(self._clock_epoch() if self._clock_epoch else time.time())
        claims = await self.verifier.verify(token, now_epoch=now, monotonic=time.monotonic())
        check_binding(claims, task_id, attempt)
        await self.check_claims(claims)
        return claims

    async def check_claims(self, claims: CapabilityClaims) -> None:
        """Check a verified token's claims against its task row (defence in depth: only a key
        holder can sign a token, but nothing it says is taken on trust).

        ``sub`` must name the token's own task and attempt, and ``org_id`` must be the task's
        org (cached per task: a task's org never changes). ``authorize`` calls it; a caller that
        verifies tokens another way calls it after verifying. Returns None. Raises
        ``Unauthenticated`` for any mismatch, a task id or org id that is not a canonical UUID,
        or a task that does not exist; ``Unavailable``.
        """
        if claims.sub != subject_for(claims.task_id, claims.attempt):
            raise errors.Unauthenticated("capability token: sub does not name its task and attempt")
        if not (_is_canonical_uuid(claims.task_id) and _is_canonical_uuid(claims.org_id)):
            raise errors.Unauthenticated("capability token: task_id and org_id must be UUIDs")
        if await self.orgs.of_task(claims.task_id) != claims.org_id:
            raise errors.Unauthenticated("capability token: org_id is not the task's org")

    # -- attempt-scoped mutations -------------------------------------------------------------

    async def heartbeat(self, req: wire.HeartbeatRequest) -> wire.HeartbeatResponse:
        """Extend the lease (never past the attempt's ``timeout_s``) and renew the capability
        token.

        Raises ``NotFound``, ``LeaseLost``, ``TaskCanceled``.
        """
        fence = Fence(req.task_id, req.attempt, req.lease_token)
        async with self._tx() as cur:
            locked = await lock_task(cur, req.task_id)
            decision = lifecycle.decide_heartbeat(
                locked.view, fence, now=locked.now, lease=self.lease
            )
            await cur.execute(
                Q["apply_heartbeat"],
                {
                    "task_id": fence.task_id,
                    "attempt": fence.attempt,
                    "lease_token": fence.lease_token,
                    "expires": decision.lease_expires_at,
                },
            )
            if cur.rowcount != 1:
                raise errors.LeaseLost()
        token = await self._mint(
            org_id=locked.org_id,
            task_id=req.task_id,
            attempt=req.attempt,
            timeout_s=locked.timeout_s,
            read_datasets=locked.grants,
        )
        return wire.HeartbeatResponse(
            lease_expires_at=_iso(decision.lease_expires_at), capability_token=token
        )

    async def running_attempt(self, req: wire.FenceFields) -> tuple[str, int, dict[str, Any]]:
        """``(org_id, timeout_s, payload)`` of the running attempt ``req`` fences (the
        heartbeat's fence rules: current attempt, its lease token, task running). Used to scope
        credentials to the attempt. Raises ``NotFound``, ``LeaseLost``, ``TaskCanceled``,
        ``Conflict`` for a stored payload that cannot be served."""
        fence = Fence(req.task_id, req.attempt, req.lease_token)
        async with self._tx() as cur:
            locked = await lock_task(cur, req.task_id)
            lifecycle.check_fence(locked.view, fence, Op.HEARTBEAT, now=locked.now)
            row = await _task_row(cur, req.task_id)
        return row.org_id, row.timeout_s, dict(stored_json(row.payload, "payload") or {})

    async def emit_events(self, req: wire.EventsRequest) -> wire.EventsResponse:
        """Record events of the current attempt; keys already emitted by the task are skipped.

        Raises ``ValidationFailed`` (a payload over the JSON limits, a key twice in one call),
        ``NotFound``, ``LeaseLost``, ``TaskCanceled``, ``Conflict``.
        """
        fence = Fence(req.task_id, req.attempt, req.lease_token)
        for j, event in enumerate(req.events):
            json_limits.check(event.payload, path=f"events[{j}].payload")
        async with self._tx() as cur:
            locked = await lock_task(cur, req.task_id)
            lifecycle.check_fence(locked.view, fence, Op.EVENTS, now=locked.now)
            inserted = await _insert_events(cur, fence, req.events)
        return wire.EventsResponse(accepted=inserted, duplicates=len(req.events) - inserted)

    async def publish_buffer(self, req: wire.BufferPublishRequest) -> wire.BufferPublishResponse:
        """Record a buffer batch pointer of the current attempt and announce it to the sink.

        The object must lie under the attempt's staging prefix and match its declared size and
        checksum. A repeated key with the same pointer is a no-op. Raises ``UnsafeKey``,
        ``ValidationFailed``, ``NotFound``, ``LeaseLost``, ``TaskCanceled``,
        ``IdempotencyMismatch``.
        """
        fence = Fence(req.task_id, req.attempt, req.lease_token)
        batch = req.batch
        inline: str | None = None
        if batch.rows is not None:
            for j, r in enumerate(batch.rows):
                json_limits.check(r, path=f"batch.rows[{j}]")
            data = inline_lines(batch.rows)
            inline = data.decode()
            if len(data) > wire.INLINE_MAX_BYTES:
                raise errors.ValidationFailed(
                    f"inline rows take {len(data)} bytes as JSON lines, more than "
                    f"{wire.INLINE_MAX_BYTES}: stage them as an object",
                    field="batch.rows",
                )
            mine = BufferBatchRow(
                batch.dataset,
                None,
                len(batch.rows),
                len(data),
                hashlib.sha256(data).hexdigest(),
                req.attempt,
                _scope_doc(batch.scope),
            )
        else:
            validate_key(str(batch.object_key))
            mine = BufferBatchRow(
                batch.dataset,
                batch.object_key,
                int(batch.row_count or 0),
                int(batch.byte_size or 0),
                str(batch.sha256),
                req.attempt,
                _scope_doc(batch.scope),
            )
        async with self._tx() as cur:
            locked = await lock_task(cur, req.task_id)
            lifecycle.check_fence(locked.view, fence, Op.BUFFER_PUBLISH, now=locked.now)
            prefix = staging_prefix(locked.org_id, req.task_id, req.attempt)
            if batch.object_key is not None and not is_within(batch.object_key, prefix):
                raise errors.UnsafeKey(
                    f"object_key must lie under the attempt's staging prefix {prefix}",
                    field="batch.object_key",
                )
            found = await fetch(
                cur, BufferBatchRow, Q["buffer_batch"], {"task_id": req.task_id, "key": batch.key}
            )
            if found:
                if not _same_batch(found[0], mine):
                    raise errors.IdempotencyMismatch("batch key reused with another pointer")
                return wire.BufferPublishResponse(accepted=True, duplicate=True)
            if self.object_store is not None and batch.object_key is not None:
                info = await self.object_store.head(batch.object_key)
                if info.size != mine.byte_size or info.sha256 != mine.sha256:
                    raise errors.ValidationFailed(
                        "the object does not match byte_size/sha256", field="batch.sha256"
                    )
            await cur.execute(
                Q["insert_buffer_batch"],
                {
                    "task_id": req.task_id,
                    "key": batch.key,
                    "attempt": req.attempt,
                    "dataset": batch.dataset,
                    "object_key": mine.object_key,
                    "row_count": mine.row_count,
                    "byte_size": mine.byte_size,
                    "sha256": mine.sha256,
                    "scope": Jsonb(mine.scope) if mine.scope is not None else None,
                    "rows": inline,
                },
            )
            await cur.execute(
                Q["insert_outbox"],
                {
                    "topic": f"buffer:{batch.dataset}",
                    "payload": Jsonb(
                        {
                            "task_id": req.task_id,
                            "batch_key": batch.key,
                            "object_key": batch.object_key,
                        }
                    ),
                },
            )
        return wire.BufferPublishResponse(accepted=True, duplicate=False)

    async def complete(self, req: wire.CompleteRequest) -> wire.CompleteResponse:
        """Finish the current attempt, with its final events, atomically.

        Same attempt, same body again → the same answer (``replay``); a different body →
        ``IdempotencyMismatch``. Raises ``ValidationFailed``, ``NotFound``, ``LeaseLost``,
        ``TaskCanceled``, ``Conflict``.
        """
        (res,) = await self.complete_many([req])
        if isinstance(res, errors.TraceError):
            raise res
        return res

    async def complete_many(
        self, reqs: Sequence[wire.CompleteRequest]
    ) -> list[wire.CompleteResponse | errors.TraceError]:
        """Complete many attempts in one transaction (group commit); per-request results.

        One request never changes another's outcome: each is checked before any SQL (values
        jsonb cannot store, repeated event keys), a request the kernel refuses gets its error
        while the others commit, and if the shared transaction still fails on a value, every
        request is retried alone so only the bad one gets the error. Raises ``ValidationFailed``
        for two requests of one task; a transient failure of the database is ``Unavailable`` in
        every request's result.
        """
        by_task: set[str] = set()
        for r in reqs:
            if r.task_id in by_task:
                raise errors.ValidationFailed("one completion per task per batch", field="task_id")
            by_task.add(r.task_id)
        results: list[wire.CompleteResponse | errors.TraceError | None] = [None] * len(reqs)
        todo: list[int] = []
        for i, r in enumerate(reqs):
            try:
                _check_completion(r)
            except errors.ValidationFailed as exc:
                results[i] = exc
            else:
                todo.append(i)
        batch = [reqs[i] for i in todo]
        try:
            answers = await self._complete_batch(batch)
        except errors.Unavailable as exc:  # the database, not a value: every request retries
            answers = [exc] * len(batch)
        except Exception as exc:
            if len(batch) == 1:
                if not isinstance(exc, errors.TraceError):
                    raise
                answers = [exc]
            else:
                log.warning(
                    "completion batch failed; completing its requests one by one",
                    extra={"error": f"{type(exc).__name__}: {exc}", "rows": len(batch)},
                )
                answers = [await self._complete_alone(r) for r in batch]
        for i, answer in zip(todo, answers, strict=True):
            results[i] = answer
        return [
            errors.NotFound("no such task", field="task_id") if r is None else r for r in results
        ]

    async def _complete_alone(
        self, req: wire.CompleteRequest
    ) -> wire.CompleteResponse | errors.TraceError:
        try:
            (answer,) = await self._complete_batch([req])
        except errors.TraceError as exc:
            return exc
        except Exception:  # a bug: this request alone fails, and the log says why
            log.exception("completion failed", extra={"task_id": req.task_id})
            return errors.Unavailable("completion failed")
        return answer

    async def _complete_batch(
        self, reqs: Sequence[wire.CompleteRequest]
    ) -> list[wire.CompleteResponse | errors.TraceError]:
        """``complete_many``'s transaction over checked requests (one per task); raises what
        the transaction raises."""
        if not reqs:
            return []
        digests = [wire.canonical_digest(r) for r in reqs]
        by_task = {r.task_id: i for i, r in enumerate(reqs)}
        results: list[wire.CompleteResponse | errors.TraceError | None] = [None] * len(reqs)
        # Output manifests are checked against the ObjectStore before the transaction and
        # recorded inside it, behind the fence (trace_lite.outputs, trace_core.commit).
        outputs: dict[int, Any] = {}
        if any(r.outputs for r in reqs):
            outputs = await prepare_outputs(self.pool, self.object_store, reqs)
        async with self._tx() as cur:
            rows = await fetch(
                cur, LockedTask, Q["lock_tasks"], {"task_ids": pg_array(list(by_task))}
            )
            apply: list[tuple[int, lifecycle.CompleteDecision]] = []
            for row in rows:
                view = row.view
                now = row.now
                i = by_task[view.task_id]
                r = reqs[i]
                try:
                    decision = lifecycle.decide_complete(
                        view,
                        Fence(r.task_id, r.attempt, r.lease_token),
                        outcome=Outcome(r.outcome),
                        retryable=r.retryable,
                        digest=digests[i],
                        now=now,
                        retry=self.retry,
                        rand=self._rand(),
                        error=r.error,
                    )
                except errors.TraceError as exc:
                    results[i] = exc
                    continue
                if decision.replay:
                    results[i] = wire.CompleteResponse(r.task_id, r.attempt, view.state.value, True)
                    continue
                if i in outputs:
                    try:
                        if isinstance(outputs[i], errors.TraceError):
                            raise outputs[i]
                        await apply_outputs(cur, r, outputs[i])
                    except errors.TraceError as exc:
                        results[i] = exc
                        continue
                apply.append((i, decision))
            if apply:
                for i, _ in apply:
                    r = reqs[i]
                    await _insert_events(
                        cur, Fence(r.task_id, r.attempt, r.lease_token), r.final_events
                    )
                await cur.execute(
                    Q["apply_completions"],
                    {
                        "task_ids": pg_array([reqs[i].task_id for i, _ in apply]),
                        "attempts": pg_array([reqs[i].attempt for i, _ in apply]),
                        "lease_tokens": pg_array([reqs[i].lease_token for i, _ in apply]),
                        "states": pg_array([d.state.value for _, d in apply]),
                        "outcomes": pg_array([d.attempt_outcome.value for _, d in apply]),
                        "available_ats": pg_array([d.available_at for _, d in apply]),
                        "lease_expires_ats": pg_array([d.lease_expires_at for _, d in apply]),
                        "finished_ats": pg_array([d.finished_at for _, d in apply]),
                        "results": [
                            Jsonb(reqs[i].result) if reqs[i].result is not None else None
                            for i, _ in apply
                        ],
                        "errors": [
                            Jsonb(dict(d.error)) if d.error is not None else None for _, d in apply
                        ],
                        "digests": pg_array([digests[i] for i, _ in apply]),
                    },
                )
                if cur.rowcount != len(apply):  # pragma: no cover - the rows are locked
                    raise errors.Conflict("a task changed while being completed")
                for i, d in apply:
                    r = reqs[i]
                    results[i] = wire.CompleteResponse(r.task_id, r.attempt, d.state.value, False)
        return [
            errors.NotFound("no such task", field="task_id") if r is None else r for r in results
        ]

    # -- background work ----------------------------------------------------------------------

    async def reap_once(self, batch: int = 500) -> ReapReport:
        """One reaper pass (``trace_lite.reaper``): end attempts whose lease ran out or that ran
        past their ``timeout_s``, wake due tasks, re-wake stale ones. Raises ``Unavailable``."""
        return await self.reaper.reap_once(batch)

    def consumed_topics(self) -> list[str]:
        """The outbox topics this Dispatcher publishes (``OutboxPublisher.consumed_topics``).
        Rows of other topics stay pending until a consumer of theirs exists."""
        return self.outbox.consumed_topics()

    async def publish_outbox_once(self) -> int:
        """Publish one batch of due outbox rows of the consumed topics; returns how many were
        taken (``OutboxPublisher.publish_once``). Raises ``Unavailable``."""
        return await self.outbox.publish_once()

    async def run_background(
        self, stop: asyncio.Event, *, reap_every_s: float = 0.5, outbox: bool = True
    ) -> None:
        """Run the reaper and (when it consumes a topic) the outbox publisher until ``stop`` is
        set. The publisher wakes on ``NOTIFY trace_outbox`` and polls every
        ``outbox_policy.poll_s``; failures are logged and retried with backoff (``run_every``).
        """
        loops = [
            asyncio.create_task(
                run_every(stop, reap_every_s, self.reaper.reap_once, name="reaper", logger=log)
            )
        ]
        if outbox and self.outbox.consumed_topics():
            loops.append(asyncio.create_task(self.outbox.run(stop)))
        try:
            await stop.wait()
        finally:
            for loop in loops:
                loop.cancel()
            await asyncio.gather(*loops, return_exceptions=True)


def _info(row: CreatedRow, *, created: bool = True) -> wire.TaskInfo:
    return wire.TaskInfo(
        row.task_id,
        row.org_id,
        row.operator,
        row.state,
        row.attempt,
        row.max_attempts,
        created=created,
    )


async def _task_row(cur: psycopg.AsyncCursor[Any], task_id: str) -> TaskRow:
    rows = await fetch(cur, TaskRow, Q["get_task"], {"task_id": task_id})
    if not rows:
        raise errors.NotFound("no such task", field="task_id")
    return rows[0]


async def _insert_events(
    cur: psycopg.AsyncCursor[Any], fence: Fence, events: Sequence[wire.EventIn]
) -> int:
    """Record events of ``fence``'s attempt; returns how many keys were new to the task."""
    if not events:
        return 0
    keys = [e.key for e in events]
    if len(set(keys)) != len(keys):
        raise errors.ValidationFailed("event keys must be unique in one call", field="events")
    inserted = await fetch(
        cur,
        EventKeyRow,
        Q["insert_events"],
        {
            "task_id": fence.task_id,
            "attempt": fence.attempt,
            "keys": keys,
            "types": [e.type for e in events],
            "payloads": [Jsonb(e.payload) for e in events],
        },
    )
    return len(inserted)


def _scope_doc(scope: wire.BufferScopeIn | None) -> dict[str, Any] | None:
    """The stored form of a batch scope: ``{"cursor": c}``, ``{"partition_key": k}`` or
    ``{"range": {"start": s, "end": e}}``."""
    if scope is None:
        return None
    doc: dict[str, Any] = wire.unstructure(scope)
    return {name: value for name, value in doc.items() if value is not None}


def _same_batch(found: BufferBatchRow, mine: BufferBatchRow) -> bool:
    """Whether re-publishing the pointer ``mine`` repeats the recorded pointer ``found``."""
    if found.scope != mine.scope:
        return False
    if found.attempt == mine.attempt:
        return (
            found.dataset,
            found.object_key,
            found.row_count,
            found.byte_size,
            found.sha256,
        ) == (mine.dataset, mine.object_key, mine.row_count, mine.byte_size, mine.sha256)
    # A retried attempt re-publishing the key stages its object under its own prefix: the same
    # content is a duplicate (the first pointer stands).
    return (found.dataset, found.row_count, found.byte_size, found.sha256) == (
        mine.dataset,
        mine.row_count,
        mine.byte_size,
        mine.sha256,
    )


__all__ = ["ClaimGrant", "Dispatcher", "Launcher", "ReapReport", "WakeMode"]
