"""The Dispatcher: the kernel's task lifecycle decisions applied to Postgres state.

It is a library object first: the aiohttp servers are thin adapters over it, and trusted
in-process workers (tests, benchmarks, embedders) call it directly.

Every operation is one transaction that (1) locks the rows it needs and reads the database's
``now()``, (2) asks ``trace_core.lifecycle`` for a decision, (3) applies the decision as a
compare-and-swap on ``(task_id, attempt, lease_token)`` together with the outbox rows that
announce it. Zero rows affected means someone else moved the state on: a domain ``Conflict``.

The ``Dispatcher`` is the one face of the modules that hold each concern, and composes them:

* ``trace_lite.task_admin`` -- ``TaskAdmin``: create, cancel, inspect, counts;
* ``trace_lite.task_claims`` -- ``TaskClaims``: the claim path and the payload fetch (a claim's
  commit and its answer agree: the answer, tokens signed, is built before the commit);
* ``trace_lite.attempt_writes`` -- ``AttemptWrites``: heartbeats, events, buffer publishes;
* ``trace_lite.task_completions`` -- ``TaskCompletions``: group commit (one completion never
  changes another's outcome);
* ``trace_lite.attempt_tokens`` -- ``AttemptTokens``: capability tokens minted and checked
  (nothing a token says is taken on trust);
* ``trace_lite.reaper`` (the time-driven half) and ``trace_lite.outbox_publisher``, whose loops
  ``run_background`` runs.

Postgres is the state store in both profiles (RDS in AWS), so these modules are shared by them;
only the Queue, ObjectStore and Signer differ.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Sequence
from typing import Any

from psycopg_pool import AsyncConnectionPool

from trace_core import errors, wire
from trace_core import outbox as outbox_sm
from trace_core.lifecycle import LeasePolicy, RetryPolicy
from trace_core.ports import ObjectStore, Queue, Signer
from trace_core.token import CapabilityClaims, TokenPolicy
from trace_lite.attempt_tokens import AttemptTokens
from trace_lite.attempt_writes import AttemptWrites
from trace_lite.capabilities import TokenIssuer, TokenVerifier
from trace_lite.outbox_publisher import Launcher, OutboxPublisher
from trace_lite.reaper import Reaper, ReapReport
from trace_lite.task_admin import TaskAdmin
from trace_lite.task_claims import ClaimGrant, TaskClaims
from trace_lite.task_completions import TaskCompletions
from trace_lite.task_orgs import TaskOrgs
from trace_lite.task_rows import WakeMode
from trace_sdk.aio import run_every

log = logging.getLogger("trace.dispatcher")


class Dispatcher:
    """Creates, leases, fences and finishes tasks on Postgres state.

    ``wake_mode="queue"`` wakes remote workers through the outbox and ``queue``;
    ``"notify"`` only sends ``NOTIFY trace_tasks`` for in-process claimers (no outbox rows).
    Each operation's docstring is on the class that holds it (see the module docstring).
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
        self.verifier = TokenVerifier(signer, token_policy)
        self.issuer = TokenIssuer(signer)
        self.orgs = TaskOrgs(pool)
        self.tokens = AttemptTokens(
            issuer=self.issuer,
            verifier=self.verifier,
            orgs=self.orgs,
            policy=token_policy,
            clock_epoch=clock_epoch,
        )
        self.admin = TaskAdmin(pool, orgs=self.orgs, wake_mode=wake_mode)
        self.claims = TaskClaims(pool, claim_pool=self.claim_pool, lease=lease, tokens=self.tokens)
        self.attempts = AttemptWrites(
            pool, lease=lease, tokens=self.tokens, object_store=object_store
        )
        self.completions = TaskCompletions(pool, retry=retry, object_store=object_store, rand=rand)
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

    # -- admin (TaskAdmin) ----------------------------------------------------------------

    async def create_tasks(self, requests: Sequence[wire.CreateTaskRequest]) -> list[wire.TaskInfo]:
        """Create tasks and wake workers in one transaction (``TaskAdmin.create_tasks``)."""
        return await self.admin.create_tasks(requests)

    async def cancel(self, task_id: str) -> wire.TaskInfo:
        """Cancel a task (``TaskAdmin.cancel``)."""
        return await self.admin.cancel(task_id)

    async def get_task(self, task_id: str) -> dict[str, Any]:
        """The task with its attempts and events (``TaskAdmin.get_task``)."""
        return await self.admin.get_task(task_id)

    async def counts(self) -> dict[str, int]:
        """Tasks per state."""
        return await self.admin.counts()

    async def outbox_counts(self) -> dict[str, int]:
        """Outbox rows per state."""
        return await self.admin.outbox_counts()

    # -- claim / fetch (TaskClaims) ---------------------------------------------------------

    async def claim(self, task_id: str, worker_id: str = "worker") -> wire.ClaimResponse:
        """Lease a queued task to a new attempt (``TaskClaims.claim``)."""
        return await self.claims.claim(task_id, worker_id)

    async def claim_many(
        self, task_ids: Sequence[str], worker_id: str = "worker"
    ) -> wire.ClaimBatchResponse:
        """Claim several woken tasks in one transaction (``TaskClaims.claim_many``)."""
        return await self.claims.claim_many(task_ids, worker_id)

    async def claim_next(
        self, n: int, worker_id: str = "inproc", *, mint_tokens: bool = False
    ) -> list[ClaimGrant]:
        """Lease up to ``n`` queued, due tasks in-process (``TaskClaims.claim_next``)."""
        return await self.claims.claim_next(n, worker_id, mint_tokens=mint_tokens)

    async def fetch(self, task_id: str, attempt: int | None = None) -> wire.TaskPayload:
        """The full task payload for a worker (``TaskClaims.fetch``)."""
        return await self.claims.fetch(task_id, attempt)

    # -- capability tokens (AttemptTokens) ------------------------------------------------

    async def authorize(self, token: str | None, task_id: str, attempt: int) -> CapabilityClaims:
        """Verify a capability token for ``(task_id, attempt)`` (``AttemptTokens.authorize``)."""
        return await self.tokens.authorize(token, task_id, attempt)

    async def check_claims(self, claims: CapabilityClaims) -> None:
        """Check a verified token's claims against its task row
        (``AttemptTokens.check_claims``)."""
        await self.tokens.check_claims(claims)

    # -- attempt-scoped mutations (AttemptWrites, TaskCompletions) --------------------------

    async def heartbeat(self, req: wire.HeartbeatRequest) -> wire.HeartbeatResponse:
        """Extend the lease and renew the token (``AttemptWrites.heartbeat``)."""
        return await self.attempts.heartbeat(req)

    async def running_attempt(self, req: wire.FenceFields) -> tuple[str, int, dict[str, Any]]:
        """``(org_id, timeout_s, payload)`` of the attempt ``req`` fences
        (``AttemptWrites.running_attempt``)."""
        return await self.attempts.running_attempt(req)

    async def emit_events(self, req: wire.EventsRequest) -> wire.EventsResponse:
        """Record events of the current attempt (``AttemptWrites.emit_events``)."""
        return await self.attempts.emit_events(req)

    async def publish_buffer(self, req: wire.BufferPublishRequest) -> wire.BufferPublishResponse:
        """Record a buffer batch pointer (``AttemptWrites.publish_buffer``)."""
        return await self.attempts.publish_buffer(req)

    async def complete(self, req: wire.CompleteRequest) -> wire.CompleteResponse:
        """Finish the current attempt (``TaskCompletions.complete``)."""
        return await self.completions.complete(req)

    async def complete_many(
        self, reqs: Sequence[wire.CompleteRequest]
    ) -> list[wire.CompleteResponse | errors.TraceError]:
        """Complete many attempts in one group commit (``TaskCompletions.complete_many``)."""
        return await self.completions.complete_many(reqs)

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


__all__ = ["ClaimGrant", "Dispatcher", "Launcher", "ReapReport", "WakeMode"]
