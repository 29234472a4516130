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

The public names below are imported on first use (PEP 562): a process that needs one kernel
module (the Query Service's sandbox imports ``query_gate`` and ``errors`` only) does not pay for
importing ``wire``, ``lifecycle`` and ``ports`` (cattrs and their records) to reach it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

#: Public name -> the kernel module that defines it (``""``: the name is that module).
_WHERE = {
    "errors": "",
    "lifecycle": "",
    "outbox": "",
    "ports": "",
    "token": "",
    "wire": "",
    "TraceError": "errors",
    "AttemptOutcome": "lifecycle",
    "Fence": "lifecycle",
    "LeasePolicy": "lifecycle",
    "Outcome": "lifecycle",
    "RetryPolicy": "lifecycle",
    "TaskState": "lifecycle",
    "TaskView": "lifecycle",
    "ObjectInfo": "ports",
    "ObjectStore": "ports",
    "PublicKey": "ports",
    "Queue": "ports",
    "ReceivedMessage": "ports",
    "SecretStore": "ports",
    "Signer": "ports",
}

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


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if where:
        value = getattr(importlib.import_module(f"{__name__}.{where}"), name)
    else:
        value = importlib.import_module(f"{__name__}.{name}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
