"""The task/attempt lifecycle and lease state machine.

Theory of operation
-------------------
A *task* is one unit of work; each time a worker leases it, a new *attempt* starts with a fresh
random *lease token*. The triple ``(task_id, attempt, lease_token)`` is the *fence*: every
mutation an attempt makes (heartbeat, events, buffer batches, completion) must present it, and
the store applies the mutation as a compare-and-swap on it.

States (the values the database stores)::

    pending ──due──▶ queued ──claim──▶ running ──succeeded──▶ completed
       ▲                                 │  │
       └──── failed / lease expired ─────┘  └── failed (no attempts left, or fatal) ──▶ failed
                 (attempts left: backoff)
    any non-terminal ──cancel──▶ canceled

Invariants this module keeps (and the hypothesis tests in ``tests/unit`` check):

1. The attempt number only grows, and only on ``claim``; a claim always mints a new lease token.
2. A mutation is accepted only for the task's *current* attempt with its lease token. A stale
   attempt (a newer attempt started) never writes.
3. A late completion of the current attempt (its lease expired, possibly already reaped) is
   accepted if no newer attempt started and the task is neither ``completed`` nor
   ``canceled``: the work is done, so throwing it away would only waste it.
4. ``completed`` and ``canceled`` are final. ``failed`` is final for the scheduler, but a late
   success of its last attempt may still complete it (rule 3).
5. Completing the same attempt twice with the same body is idempotent; with a different body
   it is an ``IdempotencyMismatch``.

Nothing here performs I/O or reads the clock: callers pass ``now`` (the database's ``now()``)
and a random number for jitter, and apply the returned decision. The states, events and the
transition table the decisions consult live in ``trace_core._task_states`` (re-exported here).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any, assert_never

import attrs

from trace_core import errors
from trace_core._task_states import (
    FINAL_STATES,
    TERMINAL_STATES,
    TRANSITIONS,
    AttemptOutcome,
    TaskEvent,
    TaskState,
    mermaid_diagram,
    target_state,
)


@attrs.frozen
class RetryPolicy:
    """Retry backoff: ``base * 2**(attempt-1)`` capped, with full jitter
    (``docs/standards/operations.md``, row "retry backoff")."""

    max_attempts: int = 5
    base_s: float = 1.0
    cap_s: float = 100.0

    def delay(self, attempt: int, rand: float) -> timedelta:
        """Backoff before the attempt after ``attempt``; ``rand`` is uniform in [0, 1)."""
        ceiling = min(self.cap_s, self.base_s * (2 ** max(0, attempt - 1)))
        return timedelta(seconds=ceiling * rand)


@attrs.frozen
class LeasePolicy:
    """Lease duration and heartbeat cadence: 60 s / 15 s (``docs/standards/operations.md``, row
    "lease duration")."""

    lease_s: float = 60.0
    heartbeat_s: float = 15.0

    def expires(self, now: datetime) -> datetime:
        return now + timedelta(seconds=self.lease_s)


@attrs.frozen
class TaskView:
    """What the state machine needs to know about a task (a row of ``tasks`` + its attempt)."""

    task_id: str
    state: TaskState
    #: The current attempt number; 0 before the first claim.
    attempt: int
    #: The current attempt's lease token (``None`` before the first claim).
    lease_token: str | None
    lease_expires_at: datetime | None
    available_at: datetime
    max_attempts: int
    #: The current attempt's outcome (``None`` before the first claim).
    attempt_outcome: AttemptOutcome | None = None
    #: Digest of the current attempt's accepted completion body, if it completed.
    completion_digest: str | None = None
    #: The task's per-attempt time budget in seconds (``None``: no limit).
    timeout_s: int | None = None
    #: When the current attempt started (``None`` before the first claim).
    started_at: datetime | None = None

    @property
    def timeout_at(self) -> datetime | None:
        """When the current attempt's time budget runs out (``None``: never)."""
        if self.timeout_s is None or self.started_at is None:
            return None
        return self.started_at + timedelta(seconds=self.timeout_s)

    def past_timeout(self, now: datetime) -> bool:
        """Whether the current attempt ran past its ``timeout_s`` at ``now``."""
        timeout_at = self.timeout_at
        return timeout_at is not None and timeout_at <= now


@attrs.frozen
class Fence:
    """The fence every attempt-scoped mutation presents."""

    task_id: str
    attempt: int
    lease_token: str


class Op(enum.StrEnum):
    """Attempt-scoped mutations, for fence checks."""

    HEARTBEAT = "heartbeat"
    EVENTS = "events"
    BUFFER_PUBLISH = "buffer_publish"
    COMPLETE = "complete"


# ---------------------------------------------------------------------------------------------
# Decisions. Each returns what the store must write; the store applies it as a CAS on the fence.


def decide_create(*, delay_s: float) -> TaskState:
    """The state a new task starts in: ``pending`` until its delay elapses, else ``queued``."""
    return TaskState.PENDING if delay_s > 0 else TaskState.QUEUED


@attrs.frozen
class ClaimDecision:
    """A new attempt: the whole next row (the task is ``running`` under it)."""

    task_id: str
    attempt: int
    lease_token: str
    lease_expires_at: datetime
    #: The database's ``now`` at the claim: the attempt's ``timeout_s`` counts from here.
    started_at: datetime
    state: TaskState = TaskState.RUNNING


def decide_claim(
    task: TaskView, *, now: datetime, lease: LeasePolicy, new_lease_token: str
) -> ClaimDecision:
    """Lease a queued, due task to a new attempt.

    Raises ``TaskCanceled`` for a canceled task, ``TaskNotClaimable`` if it is not queued or not
    yet due (running under another lease, pending backoff, or finished).
    """
    if task.state is TaskState.CANCELED:
        raise errors.TaskCanceled()
    if task.state is not TaskState.QUEUED or task.available_at > now:
        raise errors.TaskNotClaimable(
            f"task is {task.state.value}, not claimable", details={"state": task.state.value}
        )
    target_state(task.state, TaskEvent.CLAIM, attempts_left=True)
    expires = lease.expires(now)
    if task.timeout_s is not None:  # the lease never outlives the attempt's time budget
        expires = min(expires, now + timedelta(seconds=task.timeout_s))
    return ClaimDecision(
        task_id=task.task_id,
        attempt=task.attempt + 1,
        lease_token=new_lease_token,
        lease_expires_at=expires,
        started_at=now,
    )


@attrs.frozen
class UnservableDecision:
    """A queued task whose payload no worker can be given: it fails instead of starting."""

    task_id: str
    state: TaskState
    finished_at: datetime
    #: The task's ``error`` column.
    error: Mapping[str, str]


def decide_unservable(task: TaskView, *, now: datetime, reason: str) -> UnservableDecision:
    """A claim would hand out a payload that cannot be served (stored before today's limits,
    or written around the API): the task fails at once with ``reason``; no attempt starts, so
    nothing is leased that the claimer is not told about. Raises as ``target_state``.
    """
    state = target_state(task.state, TaskEvent.UNSERVABLE, attempts_left=False)
    return UnservableDecision(
        task_id=task.task_id,
        state=state,
        finished_at=now,
        error={"code": "payload_unservable", "message": reason},
    )


def check_fence(task: TaskView, fence: Fence, op: Op, *, now: datetime) -> None:
    """Check that ``fence`` names the task's current attempt and that ``op`` is still allowed
    at ``now``.

    Raises ``LeaseLost`` for a stale attempt, a wrong lease token, or an attempt that ran past
    the task's ``timeout_s`` (its time budget is a hard limit: unlike a lapsed lease, no late
    write is accepted), ``TaskCanceled`` for a canceled task, ``Conflict`` when the attempt
    already finished (except an identical completion, which ``decide_complete`` treats as
    idempotent).
    """
    if fence.attempt != task.attempt or task.lease_token is None:
        raise errors.LeaseLost(
            "a newer attempt started" if fence.attempt < task.attempt else "no such attempt",
            details={"current_attempt": task.attempt},
        )
    if fence.lease_token != task.lease_token:
        raise errors.LeaseLost("lease token does not match the current attempt")
    if task.state is TaskState.CANCELED:
        raise errors.TaskCanceled()
    if task.past_timeout(now):
        raise errors.LeaseLost(
            f"the attempt ran past the task's timeout_s ({task.timeout_s} s)",
            details={"timeout_s": task.timeout_s},
        )
    if op is Op.HEARTBEAT:
        if task.state is not TaskState.RUNNING:
            raise errors.LeaseLost(
                f"the lease was lost (task is {task.state.value})",
                details={"state": task.state.value},
            )
        return
    if op is not Op.COMPLETE and task.attempt_outcome not in (
        AttemptOutcome.RUNNING,
        AttemptOutcome.TIMED_OUT,
    ):
        raise errors.Conflict("the attempt already finished")


@attrs.frozen
class HeartbeatDecision:
    lease_expires_at: datetime


def decide_heartbeat(
    task: TaskView, fence: Fence, *, now: datetime, lease: LeasePolicy
) -> HeartbeatDecision:
    """Extend the current attempt's lease, never past its time budget. Raises as
    ``check_fence``."""
    check_fence(task, fence, Op.HEARTBEAT, now=now)
    expires = lease.expires(now)
    timeout_at = task.timeout_at
    if timeout_at is not None:
        expires = min(expires, timeout_at)
    return HeartbeatDecision(lease_expires_at=expires)


class Outcome(enum.StrEnum):
    """What a completion reports."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"


@attrs.frozen
class CompleteDecision:
    """The end of an attempt: the whole next row (nothing to write for a ``replay``)."""

    #: ``True`` when this repeats an accepted completion with the same body: write nothing.
    replay: bool
    state: TaskState
    attempt_outcome: AttemptOutcome
    #: When the task is (or becomes again, for a retry) due.
    available_at: datetime
    #: The lease after the completion: ``None`` unless the task is still running.
    lease_expires_at: datetime | None = None
    #: ``now`` when the task reaches a terminal state, else ``None``.
    finished_at: datetime | None = None
    #: The task's ``error`` column: what the attempt reported (``None`` for a success).
    error: Mapping[str, Any] | None = None


def _complete(
    task: TaskView,
    state: TaskState,
    outcome: AttemptOutcome,
    *,
    now: datetime,
    error: Mapping[str, Any] | None,
    available_at: datetime | None = None,
) -> CompleteDecision:
    if outcome is AttemptOutcome.FAILED and error is None:
        error = {"code": "failed", "message": f"attempt {task.attempt} failed"}
    return CompleteDecision(
        replay=False,
        state=state,
        attempt_outcome=outcome,
        available_at=available_at or task.available_at,
        lease_expires_at=task.lease_expires_at if state is TaskState.RUNNING else None,
        finished_at=now if state in TERMINAL_STATES else None,
        error=error,
    )


def decide_complete(
    task: TaskView,
    fence: Fence,
    *,
    outcome: Outcome,
    retryable: bool,
    digest: str,
    now: datetime,
    retry: RetryPolicy,
    rand: float,
    error: Mapping[str, Any] | None = None,
) -> CompleteDecision:
    """Finish the current attempt; ``error`` is what it reported.

    ``digest`` identifies the completion body (for idempotent replays). ``outcome=canceled`` is
    how a worker acknowledges a canceled task it did not run. Raises ``LeaseLost`` (stale
    attempt, wrong lease token), ``TaskCanceled``, ``IdempotencyMismatch`` (completed before
    with another body), ``Conflict``.
    """
    if task.completion_digest is not None and fence.attempt == task.attempt:
        if fence.lease_token != task.lease_token:
            raise errors.LeaseLost("lease token does not match the current attempt")
        if task.completion_digest == digest:
            return CompleteDecision(
                replay=True,
                state=task.state,
                attempt_outcome=task.attempt_outcome or AttemptOutcome.SUCCEEDED,
                available_at=task.available_at,
                lease_expires_at=task.lease_expires_at,
            )
        raise errors.IdempotencyMismatch("this attempt already completed with a different body")
    if outcome is Outcome.CANCELED:
        if task.state is not TaskState.CANCELED:
            raise errors.Conflict("only a canceled task can be completed as canceled")
        if fence.attempt != task.attempt or fence.lease_token != task.lease_token:
            raise errors.LeaseLost()
        return _complete(task, TaskState.CANCELED, AttemptOutcome.CANCELED, now=now, error=error)
    check_fence(task, fence, Op.COMPLETE, now=now)
    if task.state is TaskState.COMPLETED:
        raise errors.Conflict("task already completed")
    match outcome:
        case Outcome.SUCCEEDED:
            state = target_state(task.state, TaskEvent.SUCCEED, attempts_left=True)
            return _complete(task, state, AttemptOutcome.SUCCEEDED, now=now, error=error)
        case Outcome.FAILED:
            if task.state is not TaskState.RUNNING:
                # Late failure report of an attempt the reaper already handled: record the
                # outcome, keep the scheduling decision the reaper made.
                return _complete(task, task.state, AttemptOutcome.FAILED, now=now, error=error)
            attempts_left = retryable and task.attempt < task.max_attempts
            event = TaskEvent.FAIL if retryable else TaskEvent.FAIL_FATAL
            state = target_state(task.state, event, attempts_left=attempts_left)
            return _complete(
                task,
                state,
                AttemptOutcome.FAILED,
                now=now,
                error=error,
                available_at=(
                    now + retry.delay(task.attempt, rand) if state is TaskState.PENDING else None
                ),
            )
        case _:
            assert_never(outcome)


@attrs.frozen
class ExpireDecision:
    """The reaper ends the current attempt: the whole next row it writes."""

    #: ``EXPIRE`` (the lease lapsed) or ``TIME_OUT`` (the attempt ran past ``timeout_s``).
    event: TaskEvent
    state: TaskState
    available_at: datetime
    lease_expires_at: None
    #: ``now`` when the task failed, else ``None``.
    finished_at: datetime | None
    #: The task's ``error`` column: why the last attempt ended.
    error: Mapping[str, str]
    attempt_outcome: AttemptOutcome = AttemptOutcome.TIMED_OUT


def decide_expire(
    task: TaskView, *, now: datetime, retry: RetryPolicy, rand: float
) -> ExpireDecision | None:
    """The reaper's decision for a running task; ``None`` while its lease holds.

    The lease never outlives the attempt's ``timeout_s`` (``decide_claim``,
    ``decide_heartbeat``), so an attempt that keeps heartbeating past its budget is found here
    too: it times out (``TIME_OUT``) and is retried like a lapsed lease while attempts are left.
    """
    if task.state is not TaskState.RUNNING or task.lease_expires_at is None:
        return None
    if task.lease_expires_at > now and not task.past_timeout(now):
        return None
    timed_out = task.past_timeout(now)
    event = TaskEvent.TIME_OUT if timed_out else TaskEvent.EXPIRE
    attempts_left = task.attempt < task.max_attempts
    state = target_state(task.state, event, attempts_left=attempts_left)
    message = (
        f"attempt {task.attempt} ran past the task's timeout_s ({task.timeout_s} s)"
        if timed_out
        else f"attempt {task.attempt}'s lease expired"
    )
    return ExpireDecision(
        event=event,
        state=state,
        available_at=(
            now + retry.delay(task.attempt, rand)
            if state is TaskState.PENDING
            else task.available_at
        ),
        lease_expires_at=None,
        finished_at=now if state is TaskState.FAILED else None,
        error={"code": "timed_out", "message": message},
    )


def decide_due(task: TaskView, *, now: datetime) -> bool:
    """Whether a pending task's backoff elapsed, so it moves to queued (and is woken)."""
    return task.state is TaskState.PENDING and task.available_at <= now


def decide_cancel(task: TaskView) -> TaskState | None:
    """The state a cancel moves the task to; ``None`` when already canceled (idempotent).

    Raises ``Conflict`` for a completed or failed task.
    """
    if task.state is TaskState.CANCELED:
        return None
    return target_state(task.state, TaskEvent.CANCEL, attempts_left=True)


#: What ``apply`` takes: a decision, or the bare target state of a move that changes only the
#: state (``decide_due`` -> ``queued``, ``decide_cancel``).
Decision = (
    ClaimDecision
    | HeartbeatDecision
    | CompleteDecision
    | ExpireDecision
    | UnservableDecision
    | TaskState
)


def apply(task: TaskView, decision: Decision) -> TaskView:
    """The task as it is after ``decision``: exactly the columns the store writes for it.

    The Postgres store writes these same fields (``trace_lite/sql/tasks.sql``, one CAS per
    decision, no value of its own); the hypothesis model in ``tests/unit`` calls this.
    """
    match decision:
        case ClaimDecision():
            return attrs.evolve(
                task,
                state=decision.state,
                attempt=decision.attempt,
                lease_token=decision.lease_token,
                lease_expires_at=decision.lease_expires_at,
                started_at=decision.started_at,
                attempt_outcome=AttemptOutcome.RUNNING,
                completion_digest=None,
            )
        case HeartbeatDecision():
            return attrs.evolve(task, lease_expires_at=decision.lease_expires_at)
        case CompleteDecision(replay=True):
            return task
        case CompleteDecision() | ExpireDecision():
            return attrs.evolve(
                task,
                state=decision.state,
                available_at=decision.available_at,
                lease_expires_at=decision.lease_expires_at,
                attempt_outcome=decision.attempt_outcome,
            )
        case UnservableDecision():
            return attrs.evolve(task, state=decision.state)
        case TaskState():
            return attrs.evolve(task, state=decision)
        case _:
            assert_never(decision)


__all__ = [
    "FINAL_STATES",
    "TERMINAL_STATES",
    "TRANSITIONS",
    "AttemptOutcome",
    "ClaimDecision",
    "CompleteDecision",
    "Decision",
    "ExpireDecision",
    "Fence",
    "HeartbeatDecision",
    "LeasePolicy",
    "Op",
    "Outcome",
    "RetryPolicy",
    "TaskEvent",
    "TaskState",
    "TaskView",
    "UnservableDecision",
    "apply",
    "check_fence",
    "decide_cancel",
    "decide_claim",
    "decide_complete",
    "decide_create",
    "decide_due",
    "decide_expire",
    "decide_heartbeat",
    "decide_unservable",
    "mermaid_diagram",
    "target_state",
]
