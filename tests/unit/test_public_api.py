"""Pin the public API so changes to it are deliberate, and keep the kernel pure."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

import trace_core
import trace_core.testing

KERNEL = Path(trace_core.__file__).parent
#: Every kernel module: all of ``trace_core`` except the ``trace_core.testing`` test kit.
KERNEL_MODULES = sorted(
    p for p in KERNEL.rglob("*.py") if p.relative_to(KERNEL).parts[0] != "testing"
)
#: Third-party packages the kernel may import: records and serialization (attrs, cattrs) and
#: pure signature math (cryptography, in ``jws`` only).
THIRD_PARTY = {"attrs", "cattrs", "cryptography"}
#: Standard-library modules that do I/O, schedule, spawn, or read the clock or randomness.
FORBIDDEN = {
    "asyncio",
    "concurrent",
    "threading",
    "multiprocessing",
    "selectors",
    "socket",
    "ssl",
    "http",
    "urllib",
    "subprocess",
    "os",
    "io",
    "pathlib",
    "shutil",
    "tempfile",
    "time",
    "random",
    "secrets",
    "logging",
}
#: Calls that read the clock or draw randomness (``uuid.UUID`` parsing is fine).
CLOCK_OR_RANDOM = {"now", "utcnow", "today", "time", "monotonic", "uuid1", "uuid4", "urandom"}


def test_trace_core_public_names() -> None:
    assert sorted(trace_core.__all__) == [
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
    for name in trace_core.__all__:
        assert hasattr(trace_core, name)


def test_testing_public_names() -> None:
    assert sorted(trace_core.testing.__all__) == [
        "FakeTaskSurface",
        "FetchRequest",
        "ManualClock",
        "MemoryObjectStore",
        "MemoryQueue",
        "MemorySecretStore",
        "MemorySigner",
        "TaskCall",
    ]


def _imported_roots(tree: ast.AST) -> set[str]:
    roots: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            roots.add((node.module or "").split(".")[0])
    return roots


def test_the_purity_check_covers_every_kernel_module() -> None:
    names = {str(p.relative_to(KERNEL)) for p in KERNEL_MODULES}
    assert {"jws.py", "token.py", "lifecycle.py", "wire.py", "__init__.py"} <= names
    assert not any(n.startswith("testing") for n in names)


@pytest.mark.parametrize("path", KERNEL_MODULES, ids=lambda p: str(p.relative_to(KERNEL)))
def test_kernel_modules_import_no_io_and_read_no_clock(path: Path) -> None:
    tree = ast.parse(path.read_text())
    allowed = (set(sys.stdlib_module_names) - FORBIDDEN) | THIRD_PARTY | {"trace_core"}
    roots = _imported_roots(tree)
    assert roots <= allowed, f"{path.name} imports {sorted(roots - allowed)}"
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in CLOCK_OR_RANDOM:
            raise AssertionError(f"{path.name} reads the clock or randomness: .{node.attr}")
        # ``async def`` stubs in ``ports`` describe adapters; the kernel itself never awaits.
        if isinstance(node, (ast.Await, ast.AsyncWith, ast.AsyncFor)):
            raise AssertionError(f"{path.name} awaits (line {node.lineno}): the kernel is sans-IO")


def test_the_purity_check_catches_what_it_forbids() -> None:
    for source in ("import asyncio", "from time import time", "import jwt", "import psycopg"):
        roots = _imported_roots(ast.parse(source))
        allowed = (set(sys.stdlib_module_names) - FORBIDDEN) | THIRD_PARTY | {"trace_core"}
        assert not roots <= allowed, source


def test_states_are_the_values_the_database_stores() -> None:
    schema = (
        Path(__file__).parents[2] / "src/trace_lite/sql/migrations/0001_state.sql"
    ).read_text()
    for state in trace_core.TaskState:
        assert f"'{state.value}'" in schema
    for outcome in trace_core.AttemptOutcome:
        assert f"'{outcome.value}'" in schema
