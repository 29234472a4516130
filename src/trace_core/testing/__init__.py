"""Test tools shipped with the kernel: memory adapters with fault hooks, a manual clock, a task
surface built from one function.

The port conformance suites live in ``trace_core.testing.conformance`` (they import pytest, so
they are not imported here).
"""

from trace_core.testing.clock import ManualClock
from trace_core.testing.memory_queue import MemoryQueue
from trace_core.testing.memory_secrets import MemorySecretStore
from trace_core.testing.memory_signer import MemorySigner
from trace_core.testing.memory_store import MemoryObjectStore
from trace_core.testing.task_surface import FakeTaskSurface, FetchRequest, TaskCall

__all__ = [
    "FakeTaskSurface",
    "FetchRequest",
    "ManualClock",
    "MemoryObjectStore",
    "MemoryQueue",
    "MemorySecretStore",
    "MemorySigner",
    "TaskCall",
]
