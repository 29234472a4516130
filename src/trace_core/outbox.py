"""The transactional outbox state machine.

Theory of operation
-------------------
A state change that must tell the outside world (wake a worker, announce an event) writes an
outbox row *in the same transaction* as the change. A publisher claims due ``pending`` rows with
``FOR UPDATE SKIP LOCKED`` (never an id cursor, which skips rows of transactions that commit out
of order), sends them, and records the result:

    pending ──sent──▶ published
       │ ▲
       └─┘ send failed, tries left: due again after backoff (1 s * 2^n, cap 100 s, full jitter)
       └──── send failed, no tries left (10) ──▶ dead

Publishing is at-least-once: a publisher that dies after sending and before recording resends.
Receivers therefore treat wake-ups as hints; the task row in Postgres is the truth.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Final

import attrs

from trace_core import errors


class OutboxState(enum.StrEnum):
    """An outbox row's state, stored as ``outbox.state``."""

    PENDING = "pending"
    PUBLISHED = "published"
    DEAD = "dead"


class OutboxEvent(enum.StrEnum):
    SENT = "sent"
    SEND_FAILED = "send_failed"


TRANSITIONS: Final[Mapping[tuple[OutboxState, OutboxEvent], tuple[OutboxState, ...]]] = {
    (OutboxState.PENDING, OutboxEvent.SENT): (OutboxState.PUBLISHED,),
    (OutboxState.PENDING, OutboxEvent.SEND_FAILED): (OutboxState.PENDING, OutboxState.DEAD),
}


@attrs.frozen
class OutboxPolicy:
    """Outbox defaults: batch 100, poll 1 s (+ LISTEN/NOTIFY), dead after 10 tries, backoff
    1 s * 2^n capped at 100 s with full jitter (``docs/standards/operations.md``, row "outbox").
    ``max_tries`` is the one retry limit."""

    batch_size: int = 100
    poll_s: float = 1.0
    max_tries: int = 10
    backoff_base_s: float = 1.0
    backoff_cap_s: float = 100.0

    def delay(self, tries: int, rand: float) -> timedelta:
        """Backoff after the ``tries``-th failed send; ``rand`` is uniform in [0, 1)."""
        ceiling = min(self.backoff_cap_s, self.backoff_base_s * (2 ** max(0, tries - 1)))
        return timedelta(seconds=ceiling * rand)


@attrs.frozen
class OutboxDecision:
    state: OutboxState
    tries: int
    available_at: datetime | None


def decide_sent(state: OutboxState, tries: int) -> OutboxDecision:
    """A row was handed to its consumer: the whole next row (published, one more try). The
    publisher writes exactly this. Raises ``Conflict`` unless it was pending."""
    if (state, OutboxEvent.SENT) not in TRANSITIONS:
        raise errors.Conflict(f"outbox row is {state.value}")
    return OutboxDecision(state=OutboxState.PUBLISHED, tries=tries + 1, available_at=None)


def decide_send_failed(
    state: OutboxState, tries: int, *, now: datetime, policy: OutboxPolicy, rand: float
) -> OutboxDecision:
    """A send failed: back off, or give up after ``policy.max_tries``."""
    if (state, OutboxEvent.SEND_FAILED) not in TRANSITIONS:
        raise errors.Conflict(f"outbox row is {state.value}")
    tries += 1
    if tries >= policy.max_tries:
        return OutboxDecision(state=OutboxState.DEAD, tries=tries, available_at=None)
    return OutboxDecision(
        state=OutboxState.PENDING,
        tries=tries,
        available_at=now + policy.delay(tries, rand),
    )


__all__ = [
    "TRANSITIONS",
    "OutboxDecision",
    "OutboxEvent",
    "OutboxPolicy",
    "OutboxState",
    "decide_send_failed",
    "decide_sent",
]
