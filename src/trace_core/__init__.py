"""Trace's kernel: pure state machines behind ports.

* ``trace_core.lifecycle`` -- task/attempt/lease state machine (table-driven)
* ``trace_core.outbox``    -- transactional outbox state machine
* ``trace_core.token``     -- capability-token claims and key rotation (pure)
* ``trace_core.jws``       -- compact JWS encode/verify for capability tokens
* ``trace_core.ports``     -- the Queue, ObjectStore, Signer and SecretStore protocols
* ``trace_core.wire``      -- strict wire records and their converter
* ``trace_core.errors``    -- the domain error hierarchy
* ``trace_core.testing``   -- memory adapters with fault hooks, a manual clock, conformance suites

State machine modules import only the standard library, attrs and each other; they never read
the clock or perform I/O.
"""

from trace_core import errors, lifecycle, outbox, ports, token, wire
from trace_core.errors import TraceError
from trace_core.lifecycle import (
    AttemptOutcome,
    Fence,
    LeasePolicy,
    Outcome,
    RetryPolicy,
    TaskState,
    TaskView,
)
from trace_core.ports import (
    ObjectInfo,
    ObjectStore,
    PublicKey,
    Queue,
    ReceivedMessage,
    SecretStore,
    Signer,
)

__all__ = [
    "AttemptOutcome",
    "Fence",
    "LeasePolicy",
    "ObjectInfo",
    "ObjectStore",
    "Outcome",
    "PublicKey",
    "Queue",
    "ReceivedMessage",
    "RetryPolicy",
    "SecretStore",
    "Signer",
    "TaskState",
    "TaskView",
    "TraceError",
    "errors",
    "lifecycle",
    "outbox",
    "ports",
    "token",
    "wire",
]
