"""The worker wrapper: the trust boundary around operator code.

The worker talks to the Dispatcher only through the ``trace_core.ports.TaskSurface`` port: over
HTTP (``DispatcherClient``), in-process (``trace_lite.task_surface.InProcessTaskSurface``) or a
test fake (``trace_core.testing.FakeTaskSurface``), all the same to it. Requests are wire
records; the fence of an attempt is one ``wire.FenceFields``; refusals are matched by error
class.

For each ``{"task_id"}`` wake-up it receives, the wrapper claims a lease from the Dispatcher,
fetches the task (a ``canceled`` task is acknowledged without running operator code), runs the
operator while heartbeating at ``lease/4`` and extending the message's visibility, publishes the
operator's events and buffer batches under the attempt's capability token, completes, and only
then deletes the message. Operator code receives a ``TaskContext``: never the platform
credential, the database or the queue.

Wake-ups are hints. A duplicate or late message finds the task not claimable and is deleted;
a message whose worker died reappears after its visibility timeout and is deleted the same way,
while the reaper re-queues the task itself once its lease expires. A poison wake-up (not JSON,
no ``task_id``, a ``task_id`` that is not a UUID) goes to the dead-letter queue at once with
its reason; nothing a message holds can end the worker.

SIGTERM: stop receiving, let in-flight tasks finish for ``grace_s``, then cancel the rest and
report them failed (retryable) so they are retried at once rather than after lease expiry.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import socket
import uuid
from typing import Any

import attrs

from trace_core import errors, wire
from trace_core.ports import ObjectStore, Queue, ReceivedMessage, SecretStore, TaskSurface
from trace_core.secret_names import org_secret
from trace_sdk._context import (
    LeaseLostError,
    NonRetryableError,
    Operator,
    TaskContext,
    _fields,
)
from trace_sdk.aio import Coalescer

log = logging.getLogger("trace.worker")


#: Claim refusals after which a wake-up is useless (the task runs elsewhere, ended or is gone).
_FINAL_REFUSALS: tuple[type[errors.TraceError], ...] = (
    errors.TaskNotClaimable,
    errors.TaskCanceled,
    errors.NotFound,
)


def _is_final_refusal(code: str) -> bool:
    cls = errors.class_for_code(code)
    return cls is not None and issubclass(cls, _FINAL_REFUSALS)


def parse_wakeup(body: bytes) -> tuple[str | None, str]:
    """The task id a wake-up names, in canonical form, or ``(None, why not)``.

    A wake-up is ``{"task_id": "<uuid>"}``; any spelling ``uuid.UUID`` reads (upper case,
    braces, no hyphens) is accepted and normalised to the lower-case hyphenated form."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None, "body is not JSON"
    if not isinstance(doc, dict) or "task_id" not in doc:
        return None, "body is not a JSON object with a task_id"
    raw = doc["task_id"]
    if not isinstance(raw, str):
        return None, f"task_id is not a UUID string (got {type(raw).__name__})"
    try:
        return str(uuid.UUID(raw)), ""
    except ValueError:
        return None, f"task_id is not a UUID: {raw[:80]!r}"


def _completion(fence: wire.FenceFields, **outcome: Any) -> wire.CompleteRequest:
    """The completion request of ``fence`` with ``outcome``'s fields (None ones left out).
    Raises ``ValidationFailed`` for a field the wire format refuses."""
    fields = {k: v for k, v in outcome.items() if v is not None}
    return wire.structure({**_fields(fence), **fields}, wire.CompleteRequest)


#: The most task ids in one claim (``wire.ClaimBatchRequest.task_ids``).
CLAIM_BATCH = 100


class _RetryCompletion(Exception):
    """One completion of a batch failed transiently: submit it again."""


@attrs.define
class Worker:
    """Consumes wake-ups from ``queue`` and runs ``operators`` by name."""

    surface: TaskSurface
    queue: Queue
    operators: dict[str, Operator]
    store: ObjectStore | None = None
    concurrency: int = 8
    visibility_s: float = 30.0
    wait_s: float = 20.0
    grace_s: float = 30.0
    worker_id: str = attrs.field(factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    #: Counters for progress output and tests.
    stats: dict[str, int] = attrs.field(
        factory=lambda: dict.fromkeys(
            (
                "received",
                "claimed",
                "succeeded",
                "failed",
                "canceled",
                "skipped",
                "lease_lost",
                "dead_lettered",
            ),
            0,
        )
    )
    _inflight: set[asyncio.Task[None]] = attrs.field(factory=set)
    #: Wake-ups received and not yet claimed (``_to_claim``), the one claimer task that claims
    #: them in batches, and how many wake-ups are waiting for or inside a claim.
    _to_claim: list[ReceivedMessage] = attrs.field(factory=list)
    _claimer: asyncio.Task[None] | None = None
    _claiming_n: int = 0
    #: Send completions in batches (``TaskSurface.complete_batch``).
    batch_completions: bool = True
    #: How soon a wake-up reappears after a transient claim failure (seconds, jittered).
    retry_after_s: float = 1.0
    #: Resolves a pooled attempt's ``secret_env`` (names in the org's namespace).
    secrets: SecretStore | None = None
    _acks: Coalescer[str, None] = attrs.field(init=False)
    _completions: Coalescer[wire.TokenedCompletion, None] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        # SQS deletes at most 10 receipts per call; completions go 200 to a request.
        self._acks = Coalescer(self._flush_acks, max_batch=10, linger_s=0.005)
        self._completions = Coalescer(self._flush_completions, max_batch=200, linger_s=0.002)

    async def run(self, stop: asyncio.Event) -> None:
        """Work until ``stop`` is set, then drain in-flight tasks (see the module docstring)."""
        while not stop.is_set():
            free = self.concurrency - len(self._inflight) - self._claiming_n
            if free <= 0:
                stopper = asyncio.ensure_future(stop.wait())
                # a finished claim would end the wait at once: the loop would spin
                claimer = [c for c in (self._claimer,) if c is not None and not c.done()]
                await asyncio.wait(
                    [*self._inflight, *claimer, stopper],
                    return_when=asyncio.FIRST_COMPLETED,
                )
                stopper.cancel()
                continue
            try:
                receive = asyncio.ensure_future(
                    self.queue.receive(
                        max_messages=min(free, 10),
                        visibility_timeout=self.visibility_s,
                        wait_seconds=self.wait_s,
                    )
                )
                stopper = asyncio.ensure_future(stop.wait())
                done, _ = await asyncio.wait(
                    {receive, stopper}, return_when=asyncio.FIRST_COMPLETED
                )
                stopper.cancel()
                if receive not in done:
                    receive.cancel()
                    with contextlib.suppress(asyncio.CancelledError, errors.TraceError):
                        await receive
                    break
                messages = receive.result()
            except errors.TraceError as exc:
                log.warning("receive failed", extra={"error": str(exc)})
                await asyncio.sleep(0.5)
                continue
            if messages:
                self.stats["received"] += len(messages)
                # Claims run in the background, one at a time, like a group commit: the
                # next receives overlap a claim's round trip, and the wake-ups they bring go
                # together into the next claim. Unclaimed wake-ups count against concurrency.
                self._claiming_n += len(messages)
                self._to_claim.extend(messages)
                if self._claimer is None or self._claimer.done():
                    self._claimer = asyncio.create_task(self._claim_pending())
        if self._claimer is not None:
            await self._claimer
        await self._drain()
        await self._completions.close()
        await self._acks.close()

    async def _claim_pending(self) -> None:
        """Claim the received wake-ups in batches of up to ``CLAIM_BATCH`` until none is left."""
        while self._to_claim:
            batch = self._to_claim[:CLAIM_BATCH]
            del self._to_claim[:CLAIM_BATCH]
            try:
                await self._claim_and_start(batch)
            except Exception:  # no message may end the worker: they reappear later
                log.exception("handling a receive failed")
            finally:
                self._claiming_n -= len(batch)

    async def _drain(self) -> None:
        if not self._inflight:
            return
        log.info("draining in-flight tasks", extra={"count": len(self._inflight)})
        _, pending = await asyncio.wait(set(self._inflight), timeout=self.grace_s)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=30)

    async def _claim_and_start(self, messages: list[ReceivedMessage]) -> None:
        """Claim every woken task of one receive in a single call, then start the attempts.

        A poison wake-up (not JSON, no ``task_id``, a ``task_id`` that is not a UUID) goes to
        the dead-letter queue at once with its reason; another spelling of a UUID is
        normalised. Duplicates within the batch are acknowledged at once; a task the
        Dispatcher refuses for good (running elsewhere, finished, canceled, unknown) has its
        wake-up acknowledged; any other refusal leaves the wake-up to reappear.
        """
        by_task: dict[str, ReceivedMessage] = {}
        poison: list[tuple[ReceivedMessage, str]] = []
        for message in messages:
            task_id, why = parse_wakeup(message.body)
            if task_id is None:
                poison.append((message, why))
            elif task_id in by_task:
                self.stats["skipped"] += 1
                self._delete(message)  # a duplicate wake-up in the same batch
            else:
                by_task[task_id] = message
        if poison:
            await self._dead_letter(poison)
        if not by_task:
            return
        try:
            batch = await self.surface.claim_many(list(by_task), self.worker_id)
        except errors.InvalidRequest as exc:
            if len(by_task) > 1:  # find the one the Dispatcher refuses: claim them one by one
                for task_id, message in by_task.items():
                    await self._claim_and_start_one(task_id, message)
                return
            log.warning("claim refused", extra={"error": str(exc)})
            await self._dead_letter([(m, f"claim refused: {exc}") for m in by_task.values()])
            return
        except errors.TraceError as exc:
            log.warning("claim failed; the wake-ups will reappear", extra={"error": str(exc)})
            await self._retry_soon(list(by_task.values()))
            return
        await self._start_claimed(batch, by_task)

    async def _claim_and_start_one(self, task_id: str, message: ReceivedMessage) -> None:
        try:
            batch = await self.surface.claim_many([task_id], self.worker_id)
        except errors.InvalidRequest as exc:
            log.warning("claim refused", extra={"task_id": task_id, "error": str(exc)})
            await self._dead_letter([(message, f"claim refused: {exc}")])
            return
        except errors.TraceError as exc:
            log.warning("claim failed; the wake-up will reappear", extra={"error": str(exc)})
            await self._retry_soon([message])
            return
        await self._start_claimed(batch, {task_id: message})

    async def _start_claimed(
        self, batch: wire.ClaimBatchResponse, by_task: dict[str, ReceivedMessage]
    ) -> None:
        retry: list[ReceivedMessage] = []
        for refusal in batch.refused:
            message = by_task.get(refusal.task_id)
            if message is None:
                log.warning("refusal for a task not asked for", extra={"task_id": refusal.task_id})
            elif _is_final_refusal(refusal.error):
                self.stats["skipped"] += 1
                self._delete(message)
            else:
                retry.append(message)
        if retry:
            await self._retry_soon(retry)
        for grant in batch.claims:
            message = by_task.get(grant.claim.task_id)
            if message is None:  # cannot happen with canonical ids; never crash the worker
                log.warning("claim of a task not asked for", extra={"task_id": grant.claim.task_id})
                continue
            self.stats["claimed"] += 1
            task = asyncio.create_task(self._run_attempt(grant.claim, message, grant.task))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    async def _run_attempt(
        self,
        claim: wire.ClaimResponse,
        message: ReceivedMessage,
        task: wire.TaskPayload | None = None,
    ) -> None:
        fence = wire.FenceFields(claim.task_id, claim.attempt, claim.lease_token)
        extra = {"task_id": claim.task_id, "attempt": claim.attempt}
        token = [claim.capability_token]
        if task is None:
            try:
                task = await self.surface.fetch(claim.task_id, claim.attempt)
            except errors.TraceError as exc:
                log.warning(
                    "fetch failed; the lease will expire", extra={**extra, "error": str(exc)}
                )
                return
        if task.status == "canceled":
            with contextlib.suppress(errors.TraceError):
                await self.surface.complete(token[0], _completion(fence, outcome="canceled"))
            self.stats["canceled"] += 1
            self._delete(message)
            return
        operator = self.operators.get(task.operator)
        ctx = TaskContext(task, claim.attempt, self.surface, self.store, fence, token)
        run = asyncio.create_task(self._call(operator, ctx))
        beat = asyncio.create_task(
            self._heartbeat(claim.heartbeat_interval_s, fence, token, message, run)
        )
        try:
            done, _ = await asyncio.wait(
                {run, beat}, timeout=task.timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
        except asyncio.CancelledError:
            run.cancel()
            beat.cancel()
            # Shutdown: give the task back now rather than after its lease expires.
            with contextlib.suppress(errors.TraceError):
                await self.surface.complete(
                    token[0],
                    _completion(
                        fence,
                        outcome="failed",
                        retryable=True,
                        error={"code": "worker_shutdown", "message": "worker stopped"},
                    ),
                )
            raise
        if run not in done:
            run.cancel()
            with contextlib.suppress(BaseException):
                await run
            if beat in done:  # lease lost or task canceled: someone else owns it now
                lost = beat.exception()
                if isinstance(lost, LeaseLostError) and lost.canceled:
                    # acknowledge the cancel so the attempt is closed now, not at lease expiry
                    with contextlib.suppress(errors.TraceError):
                        await self.surface.complete(
                            token[0], _completion(fence, outcome="canceled")
                        )
                    self.stats["canceled"] += 1
                else:
                    self.stats["lease_lost"] += 1
                self._delete(message)
                return
            beat.cancel()
            outcome: dict[str, Any] = {
                "outcome": "failed",
                "retryable": True,
                "error": {"code": "timeout", "message": f"exceeded {task.timeout_s}s"},
            }
        else:
            beat.cancel()
            failure = run.exception()
            if failure is None:
                outcome = {
                    "outcome": "succeeded",
                    "result": run.result(),
                    "final_events": ctx.final_events,
                }
                if ctx.outputs:
                    outcome["outputs"] = ctx.outputs
            elif isinstance(failure, NonRetryableError):
                outcome = {
                    "outcome": "failed",
                    "retryable": False,
                    "error": {"code": "operator_error", "message": str(failure)[:1000]},
                }
            elif isinstance(failure, errors.InvalidRequest | errors.Forbidden):
                # the Dispatcher refused what the attempt sent (a 403 or 4xx validation: a
                # publish into a dataset its DAG may not write, an event over the limits);
                # another attempt would send the same and be refused the same
                where = f" ({failure.field})" if failure.field else ""
                outcome = {
                    "outcome": "failed",
                    "retryable": False,
                    "error": {"code": failure.code, "message": f"{failure}{where}"[:1000]},
                }
            else:
                outcome = {
                    "outcome": "failed",
                    "retryable": True,
                    "error": {
                        "code": "operator_error",
                        "message": f"{type(failure).__name__}: {failure}"[:1000],
                    },
                }
        try:
            req = _completion(fence, **outcome)
        except errors.ValidationFailed as refused:  # e.g. a result that is not a JSON object
            req = _completion(
                fence,
                outcome="failed",
                retryable=False,
                error={"code": "invalid_outcome", "message": f"{refused.field}: {refused}"[:1000]},
            )
        try:
            await self._complete(token[0], req)
            self.stats["succeeded" if req.outcome == "succeeded" else "failed"] += 1
        except errors.Conflict as exc:
            self.stats["lease_lost"] += 1
            log.info("completion refused", extra={**extra, "error": exc.code})
        except errors.TraceError as exc:
            log.warning(
                "completion failed; the lease will expire", extra={**extra, "error": str(exc)}
            )
            return
        self._delete(message)

    async def _call(self, operator: Operator | None, ctx: TaskContext) -> dict[str, Any] | None:
        if operator is None:
            raise NonRetryableError(f"unknown operator {ctx.task.operator!r}")
        ctx.env = await self._slot_env(ctx.task)
        return await operator(ctx)

    async def _slot_env(self, task: wire.TaskPayload) -> dict[str, str]:
        """The attempt's slot ``env`` with each ``secret_env`` name resolved through the
        SecretStore, now, for this attempt only. A failure names the secret, never a value."""
        slot = task.slot
        if slot is None:
            return {}
        env = dict(slot.env)
        for var, name in sorted(slot.secret_env.items()):
            if self.secrets is None:
                raise RuntimeError(f"this worker has no secret store to resolve {var}")
            try:
                value = await self.secrets.get(org_secret(task.org_id, name))
            except errors.TraceError as exc:
                raise RuntimeError(
                    f"secret {name!r} for {var} is unavailable ({exc.code})"
                ) from None
            env[var] = value.decode()
        return env

    async def _heartbeat(
        self,
        interval: float,
        fence: wire.FenceFields,
        token: list[str],
        message: ReceivedMessage,
        run: asyncio.Task[Any],
    ) -> None:
        req = wire.HeartbeatRequest(**_fields(fence))
        while True:
            await asyncio.sleep(interval)
            try:
                renewed = await self.surface.heartbeat(token[0], req)
                token[0] = renewed.capability_token
            except errors.TaskCanceled:
                raise LeaseLostError(canceled=True) from None
            except (errors.LeaseLost, errors.Forbidden, errors.NotFound):
                raise LeaseLostError() from None
            except errors.TraceError as exc:
                log.warning("heartbeat failed", extra={**_fields(fence), "error": str(exc)})
            with contextlib.suppress(errors.TraceError):
                await self.queue.extend_visibility(message.receipt, self.visibility_s)

    async def _complete(self, token: str, req: wire.CompleteRequest) -> None:
        """Complete an attempt: alone, or batched with the completions of the same moment
        (``TaskSurface.complete_batch``; each still carries its own capability token)."""
        if not self.batch_completions:
            await self.surface.complete(token, req)
            return
        item = wire.TokenedCompletion(capability_token=token, completion=req)
        while True:
            try:
                return await self._completions.submit(item)
            except _RetryCompletion:
                await asyncio.sleep(0.2)

    async def _flush_completions(
        self, items: list[wire.TokenedCompletion]
    ) -> list[BaseException | None]:
        answers = await self.surface.complete_batch(items)  # raises if the whole call failed
        return [
            (_RetryCompletion() if isinstance(res, errors.Retryable) else res)
            if isinstance(res, errors.TraceError)
            else None
            for res in answers
        ]

    async def _dead_letter(self, letters: list[tuple[ReceivedMessage, str]]) -> None:
        """Move poison wake-ups to the dead-letter queue now (not after ``max_receives``)."""
        self.stats["dead_lettered"] += len(letters)
        for message, why in letters:
            log.warning(
                "dead-lettering a poison wake-up",
                extra={"message_id": message.message_id, "reason": why},
            )
        try:
            await self.queue.dead_letter(letters)
        except errors.TraceError as exc:  # they reappear and are dead-lettered then
            log.warning("dead-letter failed", extra={"error": str(exc), "count": len(letters)})

    async def _retry_soon(self, messages: list[ReceivedMessage]) -> None:
        """Let wake-ups whose claim failed transiently reappear after a short backoff rather
        than after the whole visibility timeout (the task is still queued: nobody else will
        wake it before the reaper's re-wake)."""
        for message in messages:
            with contextlib.suppress(errors.TraceError):
                await self.queue.extend_visibility(
                    message.receipt, self.retry_after_s * (0.5 + random.random())
                )

    def _delete(self, message: ReceivedMessage) -> None:
        """Acknowledge a wake-up; acknowledgements are deleted in batches."""
        try:
            self._acks.submit_nowait(message.receipt)
        except errors.Unavailable:  # shut down already: the wake-up reappears and is skipped
            log.info("ack after shutdown dropped", extra={"message_id": message.message_id})

    async def _flush_acks(self, receipts: list[str]) -> list[None]:
        try:
            await self.queue.delete(receipts)
        except errors.TraceError as exc:  # harmless: those wake-ups reappear and are skipped
            log.warning("ack failed", extra={"error": str(exc), "count": len(receipts)})
        return [None] * len(receipts)


# TaskContext and the operator exceptions live in trace_sdk._context; re-exported here for the
# modules that import them from the worker.
__all__ = [
    "CLAIM_BATCH",
    "LeaseLostError",
    "NonRetryableError",
    "Operator",
    "TaskContext",
    "Worker",
    "parse_wakeup",
]
