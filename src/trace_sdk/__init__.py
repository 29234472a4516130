"""Trace's worker SDK: the worker, the HTTP client of the task surface, and the asyncio helpers
they share.

Public face (the modules behind it are private)::

    from trace_sdk import Worker, TaskContext, DispatcherClient, BUILTIN_OPERATORS

- ``Worker`` consumes wake-ups from a ``Queue`` and runs operators through any
  ``trace_core.ports.TaskSurface``: ``DispatcherClient`` (HTTP),
  ``trace_lite.task_surface.InProcessTaskSurface`` or ``trace_core.testing.FakeTaskSurface``.
- An operator is ``async def op(ctx: TaskContext) -> dict | None``; ``NonRetryableError`` fails
  its task for good. ``BUILTIN_OPERATORS`` are the demo, test and benchmark operators.
- ``trace_sdk.aio`` (public module): ``run_every`` and ``Coalescer``.

Depends on ``trace_core`` (and aiohttp for the HTTP client), never on ``trace_lite`` or the
servers.
"""

from trace_sdk._client import CAPABILITY_HEADER, DispatcherClient, error_from_body
from trace_sdk._context import LeaseLostError, NonRetryableError, Operator, TaskContext
from trace_sdk._operators import BUILTIN as BUILTIN_OPERATORS
from trace_sdk._process import child_env, take_platform_token
from trace_sdk._worker import Worker, parse_wakeup

__all__ = [
    "BUILTIN_OPERATORS",
    "CAPABILITY_HEADER",
    "DispatcherClient",
    "LeaseLostError",
    "NonRetryableError",
    "Operator",
    "TaskContext",
    "Worker",
    "child_env",
    "error_from_body",
    "parse_wakeup",
    "take_platform_token",
]
