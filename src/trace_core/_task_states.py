"""The task state machine as data: states, events, the transition table and its diagram.

``trace_core.lifecycle`` (the theory of operation, the decisions) is the public face; this
module holds what the database stores (``TaskState``, ``AttemptOutcome``) and the one table of
legal moves, so a reader of either the decisions or ``docs/architecture/task_lifecycle.md``
finds the rules in one place. Pairs not in ``TRANSITIONS`` are illegal: ``target_state``
raises for them.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Final

from trace_core import errors
from trace_core._diagram import state_diagram


class TaskState(enum.StrEnum):
    """A task's state, stored as ``tasks.state``."""

    PENDING = "pending"
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELED = "canceled"


class AttemptOutcome(enum.StrEnum):
    """An attempt's outcome, stored as ``task_attempts.outcome``."""

    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    CANCELED = "canceled"


class TaskEvent(enum.StrEnum):
    """What can happen to a task: the inputs of the state machine."""

    DUE = "due"  # the backoff of a pending task elapsed (reaper)
    CLAIM = "claim"  # a worker leases the task (starts an attempt)
    SUCCEED = "succeed"  # the current attempt completes successfully
    FAIL = "fail"  # the current attempt reports a retryable failure
    FAIL_FATAL = "fail_fatal"  # the current attempt reports a non-retryable failure
    EXPIRE = "expire"  # the current attempt's lease expired (reaper)
    TIME_OUT = "time_out"  # the current attempt ran past the task's timeout_s (reaper)
    CANCEL = "cancel"  # an operator or rollback cancels the task
    #: A claim found the task's stored payload cannot be served to any worker (claim).
    UNSERVABLE = "unservable"


FINAL_STATES: Final = frozenset({TaskState.COMPLETED, TaskState.CANCELED})
TERMINAL_STATES: Final = frozenset({TaskState.COMPLETED, TaskState.FAILED, TaskState.CANCELED})

# Where a retryable failure goes depends on whether attempts are left; the table names both
# targets and the guard picks one.
_RETRY_OR_FAIL: Final = (TaskState.PENDING, TaskState.FAILED)

#: The transition table: ``(state, event) -> target`` or ``(target if attempts left, else)``.
#: Pairs not in the table are illegal. ``docs/architecture/task_lifecycle.md`` is drawn from it.
TRANSITIONS: Final[
    Mapping[tuple[TaskState, TaskEvent], TaskState | tuple[TaskState, TaskState]]
] = {
    (TaskState.PENDING, TaskEvent.DUE): TaskState.QUEUED,
    (TaskState.PENDING, TaskEvent.CANCEL): TaskState.CANCELED,
    (TaskState.QUEUED, TaskEvent.CLAIM): TaskState.RUNNING,
    (TaskState.QUEUED, TaskEvent.UNSERVABLE): TaskState.FAILED,
    (TaskState.QUEUED, TaskEvent.CANCEL): TaskState.CANCELED,
    (TaskState.RUNNING, TaskEvent.SUCCEED): TaskState.COMPLETED,
    (TaskState.RUNNING, TaskEvent.FAIL): _RETRY_OR_FAIL,
    (TaskState.RUNNING, TaskEvent.FAIL_FATAL): TaskState.FAILED,
    (TaskState.RUNNING, TaskEvent.EXPIRE): _RETRY_OR_FAIL,
    (TaskState.RUNNING, TaskEvent.TIME_OUT): _RETRY_OR_FAIL,
    (TaskState.RUNNING, TaskEvent.CANCEL): TaskState.CANCELED,
    # Late completion of the current attempt after the reaper expired it (invariant 3 of
    # ``trace_core.lifecycle``).
    (TaskState.PENDING, TaskEvent.SUCCEED): TaskState.COMPLETED,
    (TaskState.QUEUED, TaskEvent.SUCCEED): TaskState.COMPLETED,
    (TaskState.FAILED, TaskEvent.SUCCEED): TaskState.COMPLETED,
    (TaskState.PENDING, TaskEvent.FAIL): TaskState.PENDING,
    (TaskState.QUEUED, TaskEvent.FAIL): TaskState.QUEUED,
    (TaskState.FAILED, TaskEvent.FAIL): TaskState.FAILED,
    (TaskState.PENDING, TaskEvent.FAIL_FATAL): TaskState.FAILED,
    (TaskState.QUEUED, TaskEvent.FAIL_FATAL): TaskState.FAILED,
    (TaskState.FAILED, TaskEvent.FAIL_FATAL): TaskState.FAILED,
}


def target_state(state: TaskState, event: TaskEvent, *, attempts_left: bool) -> TaskState:
    """The state ``event`` moves a task in ``state`` to.

    Raises ``Conflict`` (``TaskCanceled`` for a canceled task) if the pair is not in the table.
    """
    target = TRANSITIONS.get((state, event))
    if target is None:
        if state is TaskState.CANCELED:
            raise errors.TaskCanceled(f"task is canceled; {event.value} is not allowed")
        raise errors.Conflict(f"{event.value} is not allowed in state {state.value}")
    if isinstance(target, tuple):
        return target[0] if attempts_left else target[1]
    return target


def mermaid_diagram() -> str:
    """The state diagram in Mermaid syntax, drawn from ``TRANSITIONS``."""
    return state_diagram(
        TRANSITIONS, initial=["queued", "pending"], final=["completed", "canceled", "failed"]
    )


__all__ = [
    "FINAL_STATES",
    "TERMINAL_STATES",
    "TRANSITIONS",
    "AttemptOutcome",
    "TaskEvent",
    "TaskState",
    "mermaid_diagram",
    "target_state",
]
