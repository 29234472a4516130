"""The Dispatcher as a library inside a bench process (memory signer and wake-up queue: no
HTTP, no worker), and a running task for the bench to act as (its fence)."""

from __future__ import annotations

from typing import Any

from trace_core import wire
from trace_core.lifecycle import RetryPolicy
from trace_core.ports import ObjectStore
from trace_core.testing import MemoryObjectStore, MemoryQueue, MemorySigner
from trace_lite.dispatcher import Dispatcher


def dispatcher(pool: Any, object_store: ObjectStore | None = None) -> Dispatcher:
    """A Dispatcher on ``pool`` whose wake-ups go to a memory queue nobody reads."""
    return Dispatcher(
        pool,
        signer=MemorySigner(),
        queue=MemoryQueue("q"),
        object_store=object_store or MemoryObjectStore(),
        retry=RetryPolicy(),
    )


async def running_task(d: Dispatcher, operator: str, org: str) -> wire.ClaimResponse:
    """A new task of ``operator`` in ``org``, claimed: its attempt is the running one."""
    (info,) = await d.create_tasks([wire.CreateTaskRequest(operator=operator, org=org)])
    return await d.claim(info.task_id)
