"""The lifecycle state machine: every (state, event) pair, and stateful invariants."""

from __future__ import annotations

import itertools
import uuid
from datetime import UTC, datetime, timedelta

import attrs
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from trace_core import errors
from trace_core.lifecycle import (
    TRANSITIONS,
    AttemptOutcome,
    Fence,
    LeasePolicy,
    Op,
    Outcome,
    RetryPolicy,
    TaskEvent,
    TaskState,
    TaskView,
    apply,
    check_fence,
    decide_cancel,
    decide_claim,
    decide_complete,
    decide_create,
    decide_due,
    decide_expire,
    decide_heartbeat,
    decide_unservable,
    mermaid_diagram,
    target_state,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)
LEASE = LeasePolicy(lease_s=60, heartbeat_s=15)
RETRY = RetryPolicy(max_attempts=3, base_s=1, cap_s=100)
TOKEN = "11111111-1111-4111-8111-111111111111"


def view(state: TaskState, attempt: int = 1, **kw: object) -> TaskView:
    defaults: dict[str, object] = dict(
        task_id="t",
        state=state,
        attempt=attempt,
        lease_token=TOKEN if attempt else None,
        lease_expires_at=T0 + timedelta(seconds=60),
        available_at=T0,
        max_attempts=3,
        attempt_outcome=AttemptOutcome.RUNNING if attempt else None,
    )
    defaults.update(kw)
    return TaskView(**defaults)  # type: ignore[arg-type]


# --- the table --------------------------------------------------------------------------------


@pytest.mark.parametrize(("state", "event"), list(itertools.product(TaskState, TaskEvent)))
def test_every_pair_is_legal_or_refused(state: TaskState, event: TaskEvent) -> None:
    target = TRANSITIONS.get((state, event))
    if target is None:
        expected = errors.TaskCanceled if state is TaskState.CANCELED else errors.Conflict
        with pytest.raises(expected):
            target_state(state, event, attempts_left=True)
        return
    for left in (True, False):
        got = target_state(state, event, attempts_left=left)
        if isinstance(target, tuple):
            assert got is (target[0] if left else target[1])
        else:
            assert got is target


def test_final_states_have_no_way_out_except_late_success_of_failed() -> None:
    for (state, _event), _target in TRANSITIONS.items():
        assert state not in (TaskState.COMPLETED, TaskState.CANCELED)
    assert TRANSITIONS[(TaskState.FAILED, TaskEvent.SUCCEED)] is TaskState.COMPLETED


def test_diagram_names_every_transition() -> None:
    diagram = mermaid_diagram()
    for state, event in TRANSITIONS:
        assert f"{state.value} --> " in diagram and event.value in diagram


# --- claim ------------------------------------------------------------------------------------


def test_claim_starts_next_attempt_with_new_token() -> None:
    d = decide_claim(view(TaskState.QUEUED, attempt=2), now=T0, lease=LEASE, new_lease_token="new")
    assert (d.attempt, d.lease_token) == (3, "new")
    assert d.lease_expires_at == T0 + timedelta(seconds=60)


@pytest.mark.parametrize("state", [s for s in TaskState if s is not TaskState.QUEUED])
def test_claim_refused_unless_queued(state: TaskState) -> None:
    exc = errors.TaskCanceled if state is TaskState.CANCELED else errors.TaskNotClaimable
    with pytest.raises(exc):
        decide_claim(view(state), now=T0, lease=LEASE, new_lease_token="x")


def test_claim_refused_before_available_at() -> None:
    with pytest.raises(errors.TaskNotClaimable):
        decide_claim(
            view(TaskState.QUEUED, available_at=T0 + timedelta(seconds=1)),
            now=T0,
            lease=LEASE,
            new_lease_token="x",
        )


# --- fences -----------------------------------------------------------------------------------


def test_fence_refuses_stale_attempt_and_wrong_token() -> None:
    task = view(TaskState.RUNNING, attempt=2)
    for op in Op:
        with pytest.raises(errors.LeaseLost):
            check_fence(task, Fence("t", 1, TOKEN), op, now=T0)
        with pytest.raises(errors.LeaseLost):
            check_fence(task, Fence("t", 3, TOKEN), op, now=T0)
        with pytest.raises(errors.LeaseLost):
            check_fence(task, Fence("t", 2, "other"), op, now=T0)
        check_fence(task, Fence("t", 2, TOKEN), op, now=T0)


def test_heartbeat_only_while_running() -> None:
    f = Fence("t", 1, TOKEN)
    assert decide_heartbeat(
        view(TaskState.RUNNING), f, now=T0, lease=LEASE
    ).lease_expires_at == T0 + timedelta(seconds=60)
    for state in (TaskState.PENDING, TaskState.QUEUED, TaskState.FAILED, TaskState.COMPLETED):
        with pytest.raises(errors.LeaseLost):
            decide_heartbeat(view(state), f, now=T0, lease=LEASE)
    with pytest.raises(errors.TaskCanceled):
        decide_heartbeat(view(TaskState.CANCELED), f, now=T0, lease=LEASE)


def test_events_accepted_late_but_not_after_the_attempt_reported() -> None:
    f = Fence("t", 1, TOKEN)
    check_fence(
        view(TaskState.PENDING, attempt_outcome=AttemptOutcome.TIMED_OUT), f, Op.EVENTS, now=T0
    )
    with pytest.raises(errors.Conflict):
        check_fence(
            view(TaskState.PENDING, attempt_outcome=AttemptOutcome.FAILED), f, Op.EVENTS, now=T0
        )


# --- complete ---------------------------------------------------------------------------------


def complete(
    task: TaskView,
    outcome: Outcome = Outcome.SUCCEEDED,
    *,
    retryable: bool = True,
    digest: str = "d1",
    attempt: int | None = None,
    token: str = TOKEN,
):
    return decide_complete(
        task,
        Fence("t", task.attempt if attempt is None else attempt, token),
        outcome=outcome,
        retryable=retryable,
        digest=digest,
        now=T0,
        retry=RETRY,
        rand=0.5,
    )


def test_success_completes() -> None:
    d = complete(view(TaskState.RUNNING))
    assert (d.state, d.attempt_outcome, d.replay) == (
        TaskState.COMPLETED,
        AttemptOutcome.SUCCEEDED,
        False,
    )


def test_retryable_failure_backs_off_then_fails_when_attempts_run_out() -> None:
    d = complete(view(TaskState.RUNNING, attempt=2), Outcome.FAILED)
    assert d.state is TaskState.PENDING
    assert d.available_at == T0 + timedelta(seconds=1.0)  # base 1 * 2^(2-1) * 0.5
    d = complete(view(TaskState.RUNNING, attempt=3), Outcome.FAILED)
    assert d.state is TaskState.FAILED and d.available_at == T0  # unchanged: never due again
    assert d.finished_at == T0 and d.lease_expires_at is None
    assert d.error == {"code": "failed", "message": "attempt 3 failed"}  # none was reported


def test_fatal_failure_fails_at_once() -> None:
    d = complete(view(TaskState.RUNNING), Outcome.FAILED, retryable=False)
    assert d.state is TaskState.FAILED


def test_replay_and_mismatch() -> None:
    done = view(
        TaskState.COMPLETED, attempt_outcome=AttemptOutcome.SUCCEEDED, completion_digest="d1"
    )
    assert complete(done).replay
    with pytest.raises(errors.IdempotencyMismatch):
        complete(done, digest="d2")
    with pytest.raises(errors.LeaseLost):
        complete(done, token="other")


@pytest.mark.parametrize("state", [TaskState.PENDING, TaskState.QUEUED, TaskState.FAILED])
def test_late_success_of_the_current_attempt(state: TaskState) -> None:
    task = view(state, attempt_outcome=AttemptOutcome.TIMED_OUT)
    assert complete(task).state is TaskState.COMPLETED


def test_late_failure_keeps_the_reapers_decision() -> None:
    task = view(TaskState.PENDING, attempt_outcome=AttemptOutcome.TIMED_OUT)
    d = complete(task, Outcome.FAILED)
    assert d.state is TaskState.PENDING and d.attempt_outcome is AttemptOutcome.FAILED


def test_canceled_task_refuses_success_but_takes_the_cancel_ack() -> None:
    task = view(TaskState.CANCELED)
    with pytest.raises(errors.TaskCanceled):
        complete(task)
    assert complete(task, Outcome.CANCELED).attempt_outcome is AttemptOutcome.CANCELED
    with pytest.raises(errors.Conflict):
        complete(view(TaskState.RUNNING), Outcome.CANCELED)


def test_backoff_is_capped_full_jitter() -> None:
    policy = RetryPolicy(base_s=1, cap_s=100)
    assert policy.delay(1, 0.999) < timedelta(seconds=1)
    assert policy.delay(20, 0.999) <= timedelta(seconds=100)
    assert policy.delay(5, 0.0) == timedelta(0)


def test_apply_writes_what_each_decision_decided() -> None:
    """``apply`` is the task after a decision: the columns the store writes, nothing else."""
    queued = view(TaskState.QUEUED, attempt=0, lease_token=None, attempt_outcome=None)
    failed = apply(queued, decide_unservable(queued, now=T0, reason="too deep"))
    assert failed == attrs.evolve(queued, state=TaskState.FAILED)
    claim = decide_claim(queued, now=T0, lease=LEASE, new_lease_token=TOKEN)
    running = apply(queued, claim)
    assert (running.state, running.attempt, running.lease_token, running.started_at) == (
        TaskState.RUNNING,
        1,
        TOKEN,
        T0,
    )
    assert running.attempt_outcome is AttemptOutcome.RUNNING
    done = decide_complete(
        running,
        Fence("t", 1, TOKEN),
        outcome=Outcome.SUCCEEDED,
        retryable=True,
        digest="d",
        now=T0,
        retry=RETRY,
        rand=0.5,
    )
    completed = apply(running, done)
    assert (completed.state, completed.lease_expires_at) == (TaskState.COMPLETED, None)
    replay = attrs.evolve(completed, completion_digest="d")
    again = decide_complete(
        replay,
        Fence("t", 1, TOKEN),
        outcome=Outcome.SUCCEEDED,
        retryable=True,
        digest="d",
        now=T0,
        retry=RETRY,
        rand=0.5,
    )
    assert again.replay and apply(replay, again) is replay


def test_a_new_task_is_pending_only_while_delayed() -> None:
    assert decide_create(delay_s=0) is TaskState.QUEUED
    assert decide_create(delay_s=0.5) is TaskState.PENDING


def test_an_unservable_payload_fails_a_queued_task_and_nothing_else() -> None:
    d = decide_unservable(view(TaskState.QUEUED, attempt=0), now=T0, reason="too deep")
    assert (d.state, d.finished_at, d.error["code"]) == (
        TaskState.FAILED,
        T0,
        "payload_unservable",
    )
    for state in set(TaskState) - {TaskState.QUEUED}:
        with pytest.raises(errors.Conflict):
            decide_unservable(view(state), now=T0, reason="too deep")


# --- reaper / cancel ----------------------------------------------------------------------------


def test_expire_only_after_the_lease() -> None:
    task = view(TaskState.RUNNING)
    assert decide_expire(task, now=T0, retry=RETRY, rand=0.5) is None
    later = T0 + timedelta(seconds=61)
    d = decide_expire(task, now=later, retry=RETRY, rand=0.5)
    assert d is not None and d.state is TaskState.PENDING
    d = decide_expire(view(TaskState.RUNNING, attempt=3), now=later, retry=RETRY, rand=0.5)
    assert d is not None and d.state is TaskState.FAILED
    assert decide_expire(view(TaskState.QUEUED), now=later, retry=RETRY, rand=0.5) is None


def test_an_attempt_past_its_timeout_is_timed_out_even_while_its_lease_holds() -> None:
    """``timeout_s`` is a hard budget per attempt: leases are capped at it, the reaper ends the
    attempt ``timed_out`` and retries it per policy, and nothing late from it is accepted."""
    queued = view(TaskState.QUEUED, attempt=0, timeout_s=30)
    claim = decide_claim(queued, now=T0, lease=LEASE, new_lease_token=TOKEN)
    assert claim.lease_expires_at == T0 + timedelta(seconds=30)  # not the 60 s lease
    running = view(
        TaskState.RUNNING,
        timeout_s=90,
        started_at=T0,
        lease_expires_at=T0 + timedelta(seconds=60),
    )
    f = Fence("t", 1, TOKEN)
    beat = decide_heartbeat(running, f, now=T0 + timedelta(seconds=50), lease=LEASE)
    assert beat.lease_expires_at == T0 + timedelta(seconds=90)  # capped at the budget
    late = T0 + timedelta(seconds=90)
    running = attrs.evolve(running, lease_expires_at=T0 + timedelta(seconds=200))  # pre-cap row
    d = decide_expire(running, now=late, retry=RETRY, rand=0.5)
    assert d is not None and (d.event, d.state) == (TaskEvent.TIME_OUT, TaskState.PENDING)
    assert d.attempt_outcome is AttemptOutcome.TIMED_OUT and d.finished_at is None
    assert d.error["code"] == "timed_out" and "timeout_s" in d.error["message"]
    last = attrs.evolve(running, attempt=3)
    d = decide_expire(last, now=late, retry=RETRY, rand=0.5)
    assert d is not None and (d.state, d.finished_at) == (TaskState.FAILED, late)
    for op in Op:
        with pytest.raises(errors.LeaseLost):
            check_fence(running, f, op, now=late)
    with pytest.raises(errors.LeaseLost):
        decide_heartbeat(running, f, now=late, lease=LEASE)
    timed_out = attrs.evolve(
        running, state=TaskState.PENDING, attempt_outcome=AttemptOutcome.TIMED_OUT
    )
    with pytest.raises(errors.LeaseLost):
        decide_complete(
            timed_out,
            f,
            outcome=Outcome.SUCCEEDED,
            retryable=True,
            digest="d",
            now=late,
            retry=RETRY,
            rand=0.5,
        )
    # a lapsed lease alone keeps the late-completion window (invariant 3)
    lapsed = view(TaskState.RUNNING, timeout_s=900, started_at=T0)
    d = decide_expire(lapsed, now=T0 + timedelta(seconds=61), retry=RETRY, rand=0.5)
    assert d is not None and d.event is TaskEvent.EXPIRE
    reaped = attrs.evolve(lapsed, state=TaskState.PENDING)
    check_fence(reaped, f, Op.COMPLETE, now=T0 + timedelta(seconds=61))


def test_due_and_cancel() -> None:
    assert decide_due(view(TaskState.PENDING), now=T0)
    assert not decide_due(view(TaskState.PENDING, available_at=T0 + timedelta(1)), now=T0)
    assert not decide_due(view(TaskState.QUEUED), now=T0)
    assert decide_cancel(view(TaskState.RUNNING)) is TaskState.CANCELED
    assert decide_cancel(view(TaskState.CANCELED)) is None
    for state in (TaskState.COMPLETED, TaskState.FAILED):
        with pytest.raises(errors.Conflict):
            decide_cancel(view(state))


# --- stateful: every task completes effectively once; a stale attempt never writes -------------


@attrs.define
class Attempt:
    number: int
    token: str
    outcome: AttemptOutcome = AttemptOutcome.RUNNING
    digest: str | None = None
    writes: int = 0


class LifecycleMachine(RuleBasedStateMachine):
    """Applies kernel decisions to an in-memory task the way the Postgres store does."""

    @initialize()
    def setup(self) -> None:
        self.now = T0
        self.task = view(
            TaskState.QUEUED,
            attempt=0,
            lease_token=None,
            lease_expires_at=None,
            attempt_outcome=None,
            timeout_s=90,  # longer than the lease: attempts may time out while heartbeating
        )
        self.attempts: dict[int, Attempt] = {}
        self.completions = 0
        self.stale_writes = 0

    def _current(self) -> Attempt | None:
        return self.attempts.get(self.task.attempt)

    def _sync(self) -> None:
        cur = self._current()
        self.task = attrs.evolve(
            self.task,
            attempt_outcome=cur.outcome if cur else None,
            completion_digest=cur.digest if cur else None,
        )

    @rule(seconds=st.integers(0, 200))
    def time_passes(self, seconds: int) -> None:
        self.now += timedelta(seconds=seconds)

    @rule()
    def claim(self) -> None:
        try:
            d = decide_claim(
                self.task, now=self.now, lease=LEASE, new_lease_token=str(uuid.uuid4())
            )
        except errors.Conflict:
            return
        assert d.attempt == self.task.attempt + 1
        self.attempts[d.attempt] = Attempt(d.attempt, d.lease_token)
        self.task = apply(self.task, d)
        assert self.task.state is TaskState.RUNNING and self.task.started_at == self.now
        self._sync()

    @precondition(lambda self: self.attempts)
    @rule(data=st.data())
    def heartbeat(self, data: st.DataObject) -> None:
        a = data.draw(st.sampled_from(sorted(self.attempts.values(), key=lambda x: x.number)))
        try:
            d = decide_heartbeat(
                self.task, Fence("t", a.number, a.token), now=self.now, lease=LEASE
            )
        except errors.Conflict:
            return
        assert a.number == self.task.attempt
        self.task = apply(self.task, d)

    @precondition(lambda self: self.attempts)
    @rule(
        data=st.data(),
        outcome=st.sampled_from([Outcome.SUCCEEDED, Outcome.FAILED]),
        retryable=st.booleans(),
        body=st.sampled_from(["a", "b"]),
    )
    def complete(self, data: st.DataObject, outcome: Outcome, retryable: bool, body: str) -> None:
        a = data.draw(st.sampled_from(sorted(self.attempts.values(), key=lambda x: x.number)))
        digest = f"{outcome}-{retryable}-{body}"
        try:
            d = decide_complete(
                self.task,
                Fence("t", a.number, a.token),
                outcome=outcome,
                retryable=retryable,
                digest=digest,
                now=self.now,
                retry=RETRY,
                rand=0.5,
            )
        except errors.Conflict:
            return
        if a.number != self.task.attempt:
            self.stale_writes += 1
        if d.replay:
            assert a.digest == digest
            return
        a.outcome, a.digest = d.attempt_outcome, digest
        a.writes += 1
        if d.state is TaskState.COMPLETED:
            self.completions += 1
        self.task = apply(self.task, d)
        self._sync()

    @precondition(lambda self: self.attempts)
    @rule(data=st.data())
    def emit_events(self, data: st.DataObject) -> None:
        a = data.draw(st.sampled_from(sorted(self.attempts.values(), key=lambda x: x.number)))
        try:
            check_fence(self.task, Fence("t", a.number, a.token), Op.EVENTS, now=self.now)
        except errors.Conflict:
            return
        if a.number != self.task.attempt:
            self.stale_writes += 1

    @rule()
    def reap(self) -> None:
        d = decide_expire(self.task, now=self.now, retry=RETRY, rand=0.5)
        if d is not None:
            cur = self._current()
            assert cur is not None
            cur.outcome = d.attempt_outcome
            self.task = apply(self.task, d)
            self._sync()
        if decide_due(self.task, now=self.now):
            self.task = apply(self.task, TaskState.QUEUED)

    @rule()
    def lease_expires_and_retry_is_due(self) -> None:
        """Time jumps past the lease and the backoff; the reaper runs twice."""
        self.now += timedelta(seconds=LEASE.lease_s + RETRY.cap_s + 1)
        self.reap()
        self.now += timedelta(seconds=RETRY.cap_s + 1)
        self.reap()

    @rule()
    def cancel(self) -> None:
        try:
            target = decide_cancel(self.task)
        except errors.Conflict:
            return
        if target is not None:
            self.task = apply(self.task, target)

    @invariant()
    def completes_effectively_once(self) -> None:
        assert self.completions <= 1
        if self.completions:
            assert self.task.state is TaskState.COMPLETED

    @invariant()
    def stale_attempts_never_write(self) -> None:
        assert self.stale_writes == 0
        for n, a in self.attempts.items():
            assert a.writes <= 1, f"attempt {n} finished twice"

    @invariant()
    def attempts_bounded_and_monotonic(self) -> None:
        assert self.task.attempt <= RETRY.max_attempts
        assert sorted(self.attempts) == list(range(1, self.task.attempt + 1))


TestLifecycleMachine = LifecycleMachine.TestCase
TestLifecycleMachine.settings = settings(max_examples=400, stateful_step_count=30, deadline=None)
