"""The Dispatcher service: the kernel's lifecycle decisions applied to Postgres state.

It is a library object first: the aiohttp server in ``trace_servers.dispatcher`` is a thin
adapter over it, and trusted in-process workers (tests, benchmarks, embedders) call it directly.

Every operation is one transaction that (1) locks the rows it needs and reads the database's
``now()``, (2) asks ``trace_core.lifecycle`` for a decision, (3) applies the decision as a
compare-and-swap on ``(task_id, attempt, lease_token)`` together with the outbox rows that
announce it. Zero rows affected means someone else moved the state on: a domain ``Conflict``.

Postgres is the state store in both profiles (RDS in AWS), so this module is shared by them;
only the Queue, ObjectStore and Signer differ.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, Literal, Protocol

import attrs
import psycopg
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from trace_core import errors, json_limits, lifecycle, wire
from trace_core import outbox as outbox_sm
from trace_core.lifecycle import (
    AttemptOutcome,
    Fence,
    LeasePolicy,
    Op,
    Outcome,
    RetryPolicy,
    TaskEvent,
    TaskState,
    TaskView,
)
from trace_core.object_keys import is_within, validate_key
from trace_core.ports import ObjectStore, Queue, Signer
from trace_core.token import (
    CapabilityClaims,
    TokenPolicy,
    check_binding,
    issue_claims,
    subject_for,
)
from trace_lite import sqlfile
from trace_lite.capabilities import TokenIssuer, TokenVerifier
from trace_lite.outputs import apply_outputs, prepare_outputs
from trace_lite.pg import fetch_as, transaction

log = logging.getLogger("trace.dispatcher")

Q = sqlfile.load("tasks.sql")

#: The outbox topic of task wake-ups; the publisher sends them to the task queue.
WAKE_TOPIC = "wake"
#: The outbox topic of ``runtime: lambda`` tasks; the publisher claims and invokes them.
INVOKE_TOPIC = "invoke"
#: How many ``task_id -> org_id`` pairs ``check_claims`` keeps (a task's org never changes).
TASK_ORG_CACHE_SIZE = 65_536


class Launcher(Protocol):
    """Starts ``runtime: lambda`` tasks (``trace_aws.lambda_invoker.LambdaLauncher``)."""

    async def launch(self, task_id: str) -> object: ...


WakeMode = Literal["queue", "notify"]


def staging_prefix(org_id: str, task_id: str, attempt: int) -> str:
    """Where an attempt may write objects (buffer batches, staged outputs)."""
    return f"org/{org_id}/staging/task/{task_id}/attempt/{attempt}/"


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

    @property
    def fence(self) -> Fence:
        return Fence(self.task_id, self.attempt, self.lease_token)


@attrs.frozen
class _LockedRow:
    """A task row locked for a decision, with its current attempt (``lock_tasks``,
    ``lock_expired``, ``lock_due``) and what tokens and staging prefixes need."""

    task_id: str
    state: str
    attempt: int
    lease_token: str | None
    lease_expires_at: datetime | None
    available_at: datetime
    max_attempts: int
    outcome: str | None
    completion_digest: str | None
    org_id: str
    timeout_s: int
    read_datasets: list[str] | None
    started_at: datetime | None
    #: The database's ``now()``.
    now: datetime

    @property
    def view(self) -> TaskView:
        return TaskView(
            task_id=self.task_id,
            state=TaskState(self.state),
            attempt=self.attempt,
            lease_token=self.lease_token,
            lease_expires_at=self.lease_expires_at,
            available_at=self.available_at,
            max_attempts=self.max_attempts,
            attempt_outcome=AttemptOutcome(self.outcome) if self.outcome else None,
            completion_digest=self.completion_digest,
            timeout_s=self.timeout_s,
            started_at=self.started_at,
        )


@attrs.frozen
class _ClaimRow:
    """A task locked for a claim, with everything the claim answers (``lock_*_for_claim``)."""

    task_id: str
    state: str
    attempt: int
    lease_token: str | None
    lease_expires_at: datetime | None
    available_at: datetime
    max_attempts: int
    org_id: str
    operator: str
    job_id: str | None
    timeout_s: int
    read_datasets: list[str] | None
    #: The stored payload as JSON text: parsed and checked before the claim commits.
    payload: str
    #: The database's ``now()``.
    now: datetime

    def view(self) -> TaskView:
        return TaskView(
            task_id=self.task_id,
            state=TaskState(self.state),
            attempt=self.attempt,
            lease_token=self.lease_token,
            lease_expires_at=self.lease_expires_at,
            available_at=self.available_at,
            max_attempts=self.max_attempts,
            timeout_s=self.timeout_s,
        )


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
        ),
    )


@attrs.frozen
class _OutboxRow:
    """A due outbox row claimed for publishing (``claim_outbox``)."""

    id: int
    topic: str
    payload: dict[str, Any]
    tries: int
    #: The database's ``now()``.
    now: datetime


@attrs.frozen
class ReapReport:
    expired: int = 0
    due: int = 0
    canceled_closed: int = 0
    rewoken: int = 0


def pg_array(values: Sequence[str | int | datetime | None]) -> str:
    """A Postgres array literal for values that never need quoting: UUIDs, ints, enum words,
    hex digests, ISO timestamps (no spaces, commas, quotes, braces or backslashes).

    Big batches bind one string instead of a list psycopg would dump element by element; the
    SQL casts it (``%(ids)s::uuid[]``). Raises ``ValueError`` for a value that would need
    quoting, so a wrong use fails loudly instead of changing meaning.
    """
    items = [
        "NULL" if v is None else v.isoformat() if isinstance(v, datetime) else str(v)
        for v in values
    ]
    body = ",".join(items)
    # one scan of the whole literal: no element may hold quoting characters or a comma
    if _NEEDS_QUOTING.search(body) or body.count(",") != max(len(items) - 1, 0) or "" in items:
        raise ValueError("a value needs quoting in an array literal")
    return "{" + body + "}"


_NEEDS_QUOTING = re.compile(r'[\s"{}\\]')


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


def _stored_json(text: str | None, field: str) -> Any:
    """A JSON column read as text, parsed and held to the JSON limits. Raises ``Conflict`` when
    the stored value cannot be served (nested too deep, NUL, ... written around the API)."""
    if text is None:
        return None
    try:
        return json_limits.loads(text)
    except errors.InvalidRequest as exc:
        raise errors.Conflict(
            f"the task's stored {field} cannot be served: {exc.message}", field=field
        ) from None


def _inspectable(text: str | None) -> Any:
    try:
        return _stored_json(text, "value")
    except errors.Conflict as exc:
        return {"unservable": exc.message}


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
        #: Launches ``runtime: lambda`` tasks; set by the AWS profile (``None`` in Lite).
        self.launcher: Launcher | None = None
        self._rand = rand
        self.verifier = TokenVerifier(signer, token_policy)
        self.issuer = TokenIssuer(signer)
        self._orgs: dict[str, str] = {}
        #: ``task_id -> org_id`` for ``check_claims``, least recently used dropped first.
        self._task_orgs: OrderedDict[str, str] = OrderedDict()
        self._clock_epoch = clock_epoch
        #: A queued task unclaimed this long gets a fresh wake-up (its last one was lost).
        self.rewake_after_s = rewake_after_s
        self._reap_passes = 0

    # -- plumbing ---------------------------------------------------------------------------

    def _tx(
        self, *, claim: bool = False
    ) -> contextlib.AbstractAsyncContextManager[psycopg.AsyncCursor[Any]]:
        return transaction(self.claim_pool if claim else self.pool)

    async def _org_id(self, cur: psycopg.AsyncCursor[Any], name: str) -> str:
        org_id = self._orgs.get(name)
        if org_id is None:
            await cur.execute(Q["ensure_org"], {"name": name})
            row = await cur.fetchone()
            assert row is not None
            org_id = str(row[0])
            self._orgs[name] = org_id
        return org_id

    async def _wake(self, cur: psycopg.AsyncCursor[Any], task_ids: list[str]) -> None:
        if not task_ids:
            return
        if self.wake_mode == "queue":
            await cur.execute(Q["insert_wakes"], {"topic": WAKE_TOPIC, "task_ids": task_ids})
            await cur.execute(Q["notify_outbox"])
        else:
            await cur.execute(Q["notify_tasks"])

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
        self._remember_task_org(task_id, org_id)
        return token

    def _remember_task_org(self, task_id: str, org_id: str) -> None:
        self._task_orgs[task_id] = org_id
        self._task_orgs.move_to_end(task_id)
        if len(self._task_orgs) > TASK_ORG_CACHE_SIZE:
            self._task_orgs.popitem(last=False)

    async def _task_org(self, task_id: str) -> str | None:
        org_id = self._task_orgs.get(task_id)
        if org_id is not None:
            self._task_orgs.move_to_end(task_id)
            return org_id
        async with self._tx() as cur:
            await cur.execute(Q["task_org"], {"task_id": task_id})
            row = await cur.fetchone()
        if row is None:
            return None
        org_id = str(row[0])
        self._remember_task_org(task_id, org_id)
        return org_id

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
            org_ids = [await self._org_id(cur, r.org) for r in requests]
            params = {
                "task_ids": [str(uuid.uuid4()) for _ in requests],
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
            await cur.execute(Q["insert_tasks"], params)
            rows = await cur.fetchall()
            created = {
                str(t): wire.TaskInfo(str(t), str(o), op, st, att, mx)
                for t, o, op, st, att, mx in rows
            }
            await self._wake(
                cur, [t.task_id for t in created.values() if t.state == TaskState.QUEUED]
            )
            if len(created) == len(requests):
                return [created[t] for t in params["task_ids"]]
            # Some were idempotent repeats: answer with the existing tasks, in request order.
            keyed = [
                (o, r.idempotency_key)
                for o, r in zip(org_ids, requests, strict=True)
                if r.idempotency_key is not None
            ]
            await cur.execute(
                Q["tasks_by_idempotency_key"],
                {"org_ids": [o for o, _ in keyed], "idempotency_keys": [k for _, k in keyed]},
            )
            existing = {(str(r[1]), r[6]): r for r in await cur.fetchall()}
            out: list[wire.TaskInfo] = []
            for tid, org_id, r in zip(params["task_ids"], org_ids, requests, strict=True):
                if tid in created:
                    out.append(created[tid])
                    continue
                row = existing[(org_id, r.idempotency_key)]
                out.append(
                    wire.TaskInfo(
                        str(row[0]), org_id, row[2], row[3], row[4], row[5], created=False
                    )
                )
            return out

    async def cancel(self, task_id: str) -> wire.TaskInfo:
        """Cancel a task; canceling a canceled task is a no-op.

        A running attempt learns it at its next heartbeat or completion (``TaskCanceled``).
        Raises ``NotFound``, ``Conflict`` for a completed or failed task.
        """
        async with self._tx() as cur:
            task = (await self._lock_one(cur, task_id)).view
            target = lifecycle.decide_cancel(task)
            if target is not None:
                await cur.execute(
                    Q["apply_cancel"], {"task_id": task_id, "expected_state": task.state.value}
                )
                if cur.rowcount != 1:
                    raise errors.Conflict("task changed while canceling")
            return await self._info(cur, task_id)

    async def _info(self, cur: psycopg.AsyncCursor[Any], task_id: str) -> wire.TaskInfo:
        await cur.execute(Q["get_task"], {"task_id": task_id})
        row = await cur.fetchone()
        if row is None:
            raise errors.NotFound("no such task", field="task_id")
        return wire.TaskInfo(row[0], row[1], row[3], row[5], row[6], row[8])

    async def get_task(self, task_id: str) -> dict[str, Any]:
        """The task with its attempts and events, for inspection; a stored JSON value that
        cannot be served shows as ``{"unservable": <why>}``. Raises ``NotFound``."""
        async with self._tx() as cur:
            await cur.execute(Q["get_task"], {"task_id": task_id})
            row = await cur.fetchone()
            if row is None:
                raise errors.NotFound("no such task", field="task_id")
            names = [d.name for d in cur.description or []]
            task = dict(zip(names, row, strict=True))
            await cur.execute(Q["task_attempts"], {"task_id": task_id})
            names = [d.name for d in cur.description or []]
            task["attempts"] = [dict(zip(names, r, strict=True)) for r in await cur.fetchall()]
            await cur.execute(Q["task_events"], {"task_id": task_id})
            names = [d.name for d in cur.description or []]
            task["events"] = [dict(zip(names, r, strict=True)) for r in await cur.fetchall()]
        for name in ("payload", "result", "error"):
            task[name] = _inspectable(task[name])
        for item in (*task["attempts"], *task["events"]):
            for name in ("payload", "error"):
                if name in item:
                    item[name] = _inspectable(item[name])
        return _jsonable(task)

    async def counts(self) -> dict[str, int]:
        """Tasks per state."""
        async with self._tx() as cur:
            await cur.execute(Q["task_counts"])
            return {state: n for state, n in await cur.fetchall()}

    async def outbox_counts(self) -> dict[str, int]:
        async with self._tx() as cur:
            await cur.execute(Q["outbox_counts"])
            return {state: n for state, n in await cur.fetchall()}

    # -- claim / fetch ----------------------------------------------------------------------

    async def _lock_one(self, cur: psycopg.AsyncCursor[Any], task_id: str) -> _LockedRow:
        rows = await fetch_as(cur, _LockedRow, Q["lock_tasks"], {"task_ids": [task_id]})
        if not rows:
            raise errors.NotFound("no such task", field="task_id")
        return rows[0]

    async def _start_attempts(
        self, cur: psycopg.AsyncCursor[Any], rows: Sequence[_ClaimRow], worker_id: str
    ) -> tuple[list[ClaimGrant], list[wire.ClaimRefusal]]:
        """Start an attempt for each claimable row, inside the claim's transaction, with the
        whole answer built before anything commits: a payload that cannot be served fails its
        task instead of starting an attempt nobody is told about (``decide_unservable``)."""
        starts: list[tuple[_ClaimRow, lifecycle.ClaimDecision, dict[str, Any]]] = []
        refused: list[wire.ClaimRefusal] = []
        unservable: list[lifecycle.UnservableDecision] = []
        for row in rows:
            view = row.view()
            try:
                decision = lifecycle.decide_claim(
                    view, now=row.now, lease=self.lease, new_lease_token=str(uuid.uuid4())
                )
            except errors.TraceError as exc:
                refused.append(wire.ClaimRefusal(view.task_id, exc.code, exc.message))
                continue
            try:
                payload = json_limits.loads(row.payload)
                if not isinstance(payload, dict):
                    raise errors.ValidationFailed("the payload is not an object", field="$")
            except errors.InvalidRequest as exc:
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
                    "errors": [Jsonb(d.error) for d in unservable],
                    "finished_ats": [d.finished_at for d in unservable],
                },
            )
            for d in unservable:
                log.warning(
                    "task payload cannot be served; task failed",
                    extra={"task_id": d.task_id, "reason": d.error["message"]},
                )
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
        if len(await cur.fetchall()) != len(starts):  # pragma: no cover - the rows are locked
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
            rows = await fetch_as(cur, _ClaimRow, Q["lock_tasks_for_claim"], {"task_ids": ids})
            grants, refused = await self._start_attempts(cur, rows, worker_id)
            missing = set(ids) - {r.task_id for r in rows}
            if missing:
                await cur.execute(Q["existing_tasks"], {"task_ids": list(missing)})
                exists = {r[0] for r in await cur.fetchall()}
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
            rows = await fetch_as(cur, _ClaimRow, Q["lock_next_queued"], {"n": n})
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
            await cur.execute(Q["get_task"], {"task_id": task_id})
            row = await cur.fetchone()
        if row is None:
            raise errors.NotFound("no such task", field="task_id")
        (
            tid,
            org_id,
            job_id,
            operator,
            payload,
            state,
            current,
            _lease_exp,
            max_attempts,
            timeout_s,
            *_rest,
        ) = row
        return wire.TaskPayload(
            task_id=tid,
            org_id=org_id,
            job_id=job_id,
            operator=operator,
            payload=_stored_json(payload, "payload") or {},
            status=state,
            attempt=current,
            max_attempts=max_attempts,
            timeout_s=timeout_s,
            staging_prefix=staging_prefix(org_id, tid, current if attempt is None else attempt),
        )

    # -- capability tokens ------------------------------------------------------------------

    async def authorize(self, token: str | None, task_id: str, attempt: int) -> CapabilityClaims:
        """Verify a capability token and bind it to ``(task_id, attempt)``.

        Raises ``Unauthenticated`` (missing, malformed, bad signature, unknown key, expired),
        ``Forbidden`` (another task or attempt).
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
        if await self._task_org(claims.task_id) != claims.org_id:
            raise errors.Unauthenticated("capability token: org_id is not the task's org")

    # -- attempt-scoped mutations -------------------------------------------------------------

    async def heartbeat(self, req: wire.HeartbeatRequest) -> wire.HeartbeatResponse:
        """Extend the lease and renew the capability token.

        Raises ``NotFound``, ``LeaseLost``, ``TaskCanceled``.
        """
        fence = Fence(req.task_id, req.attempt, req.lease_token)
        async with self._tx() as cur:
            locked = await self._lock_one(cur, req.task_id)
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
            read_datasets=tuple(locked.read_datasets or ()),
        )
        return wire.HeartbeatResponse(
            lease_expires_at=_iso(decision.lease_expires_at), capability_token=token
        )

    async def running_attempt(self, req: wire.FenceFields) -> tuple[str, int, dict[str, Any]]:
        """``(org_id, timeout_s, payload)`` of the running attempt ``req`` fences (the
        heartbeat's fence rules: current attempt, its lease token, task running). Used to scope
        credentials to the attempt. Raises ``NotFound``, ``LeaseLost``, ``TaskCanceled``."""
        fence = Fence(req.task_id, req.attempt, req.lease_token)
        async with self._tx() as cur:
            locked = await self._lock_one(cur, req.task_id)
            lifecycle.check_fence(locked.view, fence, Op.HEARTBEAT, now=locked.now)
            await cur.execute(Q["get_task"], {"task_id": req.task_id})
            row = await _one(cur)
        return str(row[1]), int(row[9]), dict(_stored_json(row[4], "payload") or {})

    async def emit_events(self, req: wire.EventsRequest) -> wire.EventsResponse:
        """Record events of the current attempt; keys already emitted by the task are skipped.

        Raises ``NotFound``, ``LeaseLost``, ``TaskCanceled``, ``Conflict``.
        """
        fence = Fence(req.task_id, req.attempt, req.lease_token)
        for j, event in enumerate(req.events):
            json_limits.check(event.payload, path=f"events[{j}].payload")
        async with self._tx() as cur:
            locked = await self._lock_one(cur, req.task_id)
            lifecycle.check_fence(locked.view, fence, Op.EVENTS, now=locked.now)
            inserted = await self._insert_events(cur, fence, req.events)
        return wire.EventsResponse(accepted=inserted, duplicates=len(req.events) - inserted)

    async def _insert_events(
        self, cur: psycopg.AsyncCursor[Any], fence: Fence, events: Sequence[wire.EventIn]
    ) -> int:
        if not events:
            return 0
        keys = [e.key for e in events]
        if len(set(keys)) != len(keys):
            raise errors.ValidationFailed("event keys must be unique in one call", field="events")
        await cur.execute(
            Q["insert_events"],
            {
                "task_id": fence.task_id,
                "attempt": fence.attempt,
                "keys": keys,
                "types": [e.type for e in events],
                "payloads": [Jsonb(e.payload) for e in events],
            },
        )
        return len(await cur.fetchall())

    async def publish_buffer(self, req: wire.BufferPublishRequest) -> wire.BufferPublishResponse:
        """Record a buffer batch pointer of the current attempt and announce it to the sink.

        The object must lie under the attempt's staging prefix and match its declared size and
        checksum. A repeated key with the same pointer is a no-op. Raises ``UnsafeKey``,
        ``ValidationFailed``, ``NotFound``, ``LeaseLost``, ``TaskCanceled``,
        ``IdempotencyMismatch``.
        """
        fence = Fence(req.task_id, req.attempt, req.lease_token)
        batch = req.batch
        validate_key(batch.object_key)
        async with self._tx() as cur:
            locked = await self._lock_one(cur, req.task_id)
            lifecycle.check_fence(locked.view, fence, Op.BUFFER_PUBLISH, now=locked.now)
            prefix = staging_prefix(locked.org_id, req.task_id, req.attempt)
            if not is_within(batch.object_key, prefix):
                raise errors.UnsafeKey(
                    f"object_key must lie under the attempt's staging prefix {prefix}",
                    field="batch.object_key",
                )
            await cur.execute(Q["buffer_batch"], {"task_id": req.task_id, "key": batch.key})
            existing = await cur.fetchone()
            if existing is not None:
                *pointer, first_attempt = existing
                if first_attempt == req.attempt:
                    same = tuple(pointer) == (
                        batch.dataset,
                        batch.object_key,
                        batch.row_count,
                        batch.byte_size,
                        batch.sha256,
                    )
                else:
                    # A retried attempt re-publishing the key stages its object under its own
                    # prefix: the same content is a duplicate (the first pointer stands).
                    same = (pointer[0], *pointer[2:]) == (
                        batch.dataset,
                        batch.row_count,
                        batch.byte_size,
                        batch.sha256,
                    )
                if not same:
                    raise errors.IdempotencyMismatch("batch key reused with another pointer")
                return wire.BufferPublishResponse(accepted=True, duplicate=True)
            if self.object_store is not None:
                info = await self.object_store.head(batch.object_key)
                if info.size != batch.byte_size or info.sha256 != batch.sha256:
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
                    "object_key": batch.object_key,
                    "row_count": batch.row_count,
                    "byte_size": batch.byte_size,
                    "sha256": batch.sha256,
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
        ``IdempotencyMismatch``. Raises ``NotFound``, ``LeaseLost``, ``TaskCanceled``,
        ``Conflict``.
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
            rows = await fetch_as(
                cur, _LockedRow, Q["lock_tasks"], {"task_ids": pg_array(list(by_task))}
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
                    await self._insert_events(
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
                done = {r[0] for r in await cur.fetchall()}
                for i, d in apply:
                    r = reqs[i]
                    if r.task_id in done:
                        results[i] = wire.CompleteResponse(
                            r.task_id, r.attempt, d.state.value, False
                        )
                    else:  # pragma: no cover - the rows are locked, so the CAS cannot miss
                        results[i] = errors.LeaseLost()
        return [
            errors.NotFound("no such task", field="task_id") if r is None else r for r in results
        ]

    # -- background work ----------------------------------------------------------------------

    async def reap_once(self, batch: int = 500) -> ReapReport:
        """End attempts whose lease ran out or that ran past their ``timeout_s`` (retried per
        policy), wake pending tasks whose backoff elapsed, re-wake stale queued tasks."""
        async with self._tx() as cur:
            rows = await fetch_as(cur, _LockedRow, Q["lock_expired"], {"n": batch})
            expired: list[tuple[TaskView, lifecycle.ExpireDecision]] = []
            for row in rows:
                view = row.view
                d = lifecycle.decide_expire(view, now=row.now, retry=self.retry, rand=self._rand())
                if d is not None:
                    expired.append((view, d))
            if expired:
                await cur.execute(
                    Q["apply_expiries"],
                    {
                        "task_ids": [v.task_id for v, _ in expired],
                        "attempts": [v.attempt for v, _ in expired],
                        "lease_tokens": [v.lease_token for v, _ in expired],
                        "states": [d.state.value for _, d in expired],
                        "available_ats": [d.available_at for _, d in expired],
                        "finished_ats": [d.finished_at for _, d in expired],
                        "errors": [Jsonb(d.error) for _, d in expired],
                        "outcomes": [d.attempt_outcome.value for _, d in expired],
                    },
                )
            await cur.execute(Q["expire_canceled_attempts"])
            closed = cur.rowcount
        async with self._tx() as cur:
            due_rows = await fetch_as(cur, _LockedRow, Q["lock_due"], {"n": batch})
            due = [r.task_id for r in due_rows if lifecycle.decide_due(r.view, now=r.now)]
            if due:
                await cur.execute(Q["apply_due"], {"task_ids": due})
                await self._wake(cur, due)
        rewoken = 0
        if self.wake_mode == "queue":
            async with self._tx() as cur:
                await cur.execute(
                    Q["lock_stale_queued"],
                    {"older_than": f"{self.rewake_after_s} seconds", "n": batch},
                )
                stale = [r[0] for r in await cur.fetchall()]
                if stale:
                    await cur.execute(Q["touch_tasks"], {"task_ids": stale})
                    await self._wake(cur, stale)
                    rewoken = len(stale)
        self._reap_passes += 1
        if self._reap_passes % 120 == 0:
            async with self._tx() as cur:
                await cur.execute(Q["purge_published_outbox"], {"older_than": "1 hour"})
        for v, d in expired:
            log.info(
                "attempt timed out" if d.event is TaskEvent.TIME_OUT else "attempt expired",
                extra={"task_id": v.task_id, "attempt": v.attempt, "state": d.state.value},
            )
        return ReapReport(
            expired=len(expired), due=len(due), canceled_closed=max(closed, 0), rewoken=rewoken
        )

    def consumed_topics(self) -> list[str]:
        """The outbox topics this Dispatcher publishes: ``wake`` with a queue, ``invoke`` with a
        Lambda launcher. Rows of other topics stay pending until a consumer of theirs exists
        (``docs/architecture/task_lifecycle.md``, Outbox)."""
        topics = []
        if self.queue is not None:
            topics.append(WAKE_TOPIC)
        if self.launcher is not None:
            topics.append(INVOKE_TOPIC)
        return topics

    async def publish_outbox_once(self) -> int:
        """Publish one batch of due outbox rows of the topics this Dispatcher consumes
        (``consumed_topics``); returns how many were published. A row is marked published only
        once its consumer took it."""
        topics = self.consumed_topics()
        if not topics:
            return 0
        async with self._tx() as cur:
            rows = await fetch_as(
                cur,
                _OutboxRow,
                Q["claim_outbox"],
                {"n": self.outbox_policy.batch_size, "topics": topics},
            )
            if not rows:
                return 0
            sent, failed = await self._send(rows)
            if failed:
                now = rows[0].now
                decisions = [
                    outbox_sm.decide_send_failed(
                        outbox_sm.OutboxState.PENDING,
                        r.tries,
                        now=now,
                        policy=self.outbox_policy,
                        rand=self._rand(),
                    )
                    for r, _ in failed
                ]
                await cur.execute(
                    Q["outbox_failed"],
                    {
                        "ids": [r.id for r, _ in failed],
                        "states": [d.state.value for d in decisions],
                        "tries": [d.tries for d in decisions],
                        "available_ats": [d.available_at for d in decisions],
                        "error": failed[0][1],
                    },
                )
                log.warning(
                    "outbox send failed", extra={"error": failed[0][1], "rows": len(failed)}
                )
            if sent:
                published = [
                    outbox_sm.decide_sent(outbox_sm.OutboxState.PENDING, r.tries) for r in sent
                ]
                await cur.execute(
                    Q["outbox_published"],
                    {
                        "ids": [r.id for r in sent],
                        "states": [d.state.value for d in published],
                        "tries": [d.tries for d in published],
                    },
                )
            return len(sent)

    async def _send(
        self, rows: Sequence[_OutboxRow]
    ) -> tuple[list[_OutboxRow], list[tuple[_OutboxRow, str]]]:
        """Hand claimed rows to their consumers: ``(sent, [(failed row, why)])``."""
        wakes = [r for r in rows if r.topic == WAKE_TOPIC]
        invokes = [r for r in rows if r.topic == INVOKE_TOPIC]
        sent: list[_OutboxRow] = []
        failed: list[tuple[_OutboxRow, str]] = []
        if wakes and self.queue is not None:
            try:
                await self.queue.send(
                    [json.dumps({"task_id": r.payload["task_id"]}).encode() for r in wakes]
                )
                sent += wakes
            except errors.TraceError as exc:
                failed += [(r, f"{type(exc).__name__}: {exc}") for r in wakes]
        if invokes and self.launcher is not None:
            # runtime: lambda -- the Dispatcher claims and invokes with the full payload
            launcher = self.launcher
            results = await asyncio.gather(
                *(launcher.launch(r.payload["task_id"]) for r in invokes),
                return_exceptions=True,
            )
            for r, res in zip(invokes, results, strict=True):
                if isinstance(res, BaseException):
                    failed.append((r, f"{type(res).__name__}: {res}"))
                else:
                    sent.append(r)
        return sent, failed

    async def run_background(
        self, stop: asyncio.Event, *, reap_every_s: float = 0.5, outbox: bool = True
    ) -> None:
        """Run the reaper and (with a queue) the outbox publisher until ``stop`` is set.

        The publisher wakes on ``NOTIFY trace_outbox`` and polls every ``outbox_policy.poll_s``.
        Transient database failures are logged and retried with backoff.
        """
        tasks = [asyncio.create_task(self._reaper_loop(stop, reap_every_s))]
        if outbox and self.queue is not None:
            tasks.append(asyncio.create_task(self._outbox_loop(stop)))
        try:
            await stop.wait()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _reaper_loop(self, stop: asyncio.Event, every_s: float) -> None:
        failures = 0
        while not stop.is_set():
            try:
                await self.reap_once()
                failures = 0
            except errors.TraceError as exc:
                failures += 1
                log.warning("reaper pass failed", extra={"error": str(exc)})
            except Exception:  # a bug must not silently stop the reaper: log it, keep going
                failures += 1
                log.exception("reaper pass crashed")
            await _sleep_or_stop(stop, every_s if not failures else min(5.0, 0.2 * 2**failures))

    async def _outbox_loop(self, stop: asyncio.Event) -> None:
        failures = 0
        while not stop.is_set():
            try:
                # The pool's kwargs already carry autocommit=True: passing it twice was a
                # TypeError that silently killed the publisher task.
                kwargs = {**(self.pool.kwargs or {}), "autocommit": True}
                async with await psycopg.AsyncConnection.connect(
                    self.pool.conninfo, **kwargs
                ) as listen_conn:
                    await listen_conn.execute("LISTEN trace_outbox")
                    failures = 0
                    while not stop.is_set():
                        while await self.publish_outbox_once():
                            pass
                        gen = listen_conn.notifies(timeout=self.outbox_policy.poll_s, stop_after=1)
                        async for _ in gen:
                            pass
            except (psycopg.OperationalError, errors.TraceError) as exc:
                failures += 1
                log.warning("outbox publisher reconnecting", extra={"error": str(exc)})
                await _sleep_or_stop(stop, min(5.0, 0.2 * 2**failures))
            except Exception:  # a bug must not silently stop the publisher: log it, keep going
                failures += 1
                log.exception("outbox publisher crashed; restarting")
                await _sleep_or_stop(stop, min(5.0, 0.2 * 2**failures))


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


async def _one(cur: psycopg.AsyncCursor[Any]) -> Any:
    row = await cur.fetchone()
    if row is None:
        raise errors.NotFound("no such task", field="task_id")
    return row


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    return value


def connection_kwargs(*, role: Literal["api", "claim"] = "api") -> dict[str, Any]:
    """Session settings for the Dispatcher's pool (``docs/standards/operations.md``, row
    "Postgres session")."""
    statement_timeout = "5s" if role == "claim" else "30s"
    return {
        "options": (
            f"-c statement_timeout={statement_timeout} -c lock_timeout=5s "
            "-c idle_in_transaction_session_timeout=60s -c synchronous_commit=on"
        ),
        "autocommit": True,
    }


async def open_pool(
    url: str, *, min_size: int = 2, max_size: int = 10, role: Literal["api", "claim"] = "api"
) -> AsyncConnectionPool:
    """An open connection pool with the Dispatcher's session settings for ``role``."""
    pool = AsyncConnectionPool(
        url,
        min_size=min_size,
        max_size=max_size,
        kwargs=connection_kwargs(role=role),
        open=False,
        timeout=10.0,
    )
    await pool.open(wait=True, timeout=30.0)
    return pool


__all__ = [
    "WAKE_TOPIC",
    "ClaimGrant",
    "Dispatcher",
    "ReapReport",
    "connection_kwargs",
    "open_pool",
    "staging_prefix",
]
