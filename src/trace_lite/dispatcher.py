"""The Dispatcher's public face: the names callers import, from the modules that hold them.

* ``trace_lite.tasks`` -- ``Dispatcher``, the one face of the task operations, composed of
  ``trace_lite.task_admin`` (create, cancel, inspect), ``trace_lite.task_claims`` (the claim
  path, the payload fetch), ``trace_lite.attempt_writes`` (heartbeats, events, buffer publish),
  ``trace_lite.task_completions`` (group commit) and ``trace_lite.attempt_tokens`` (capability
  tokens minted and checked);
* ``trace_lite.reaper`` -- the time-driven half (lease expiry, attempt timeouts, backoff, lost
  wake-ups);
* ``trace_lite.outbox_publisher`` -- hands outbox rows to their consumers;
* ``trace_lite.task_rows`` -- the task queries and their rows, read by name;
* ``trace_lite.task_orgs`` -- org ids by name and by task, cached;
* ``trace_lite.pg`` -- the pool factory, transactions, array literals.

``from trace_lite.dispatcher import Dispatcher, open_pool`` keeps working; new code may import
from the modules above directly.
"""

from __future__ import annotations

from trace_core.object_keys import staging_prefix
from trace_lite.outbox_publisher import Launcher, OutboxPublisher
from trace_lite.pg import connection_kwargs, open_pool, pg_array
from trace_lite.reaper import Reaper, ReapReport
from trace_lite.task_rows import INVOKE_TOPIC, WAKE_TOPIC, WakeMode
from trace_lite.tasks import ClaimGrant, Dispatcher

__all__ = [
    "INVOKE_TOPIC",
    "WAKE_TOPIC",
    "ClaimGrant",
    "Dispatcher",
    "Launcher",
    "OutboxPublisher",
    "ReapReport",
    "Reaper",
    "WakeMode",
    "connection_kwargs",
    "open_pool",
    "pg_array",
    "staging_prefix",
]
