"""Pin the public API so changes to it are deliberate, and keep the kernel pure."""

from __future__ import annotations

import ast
from pathlib import Path

import trace_core
import trace_core.testing

KERNEL = Path(trace_core.__file__).parent
STATE_MACHINES = [
    "lifecycle.py",
    "outbox.py",
    "token.py",
    "commit.py",
    "access.py",
    "errors.py",
    "ports.py",
    "queue_args.py",
    "object_keys.py",
    "secret_names.py",
]
FORBIDDEN = {
    "asyncio",
    "psycopg",
    "psycopg_pool",
    "boto3",
    "botocore",
    "aiohttp",
    "duckdb",
    "jwt",
    "time",
    "socket",
    "subprocess",
    "random",
}


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
        "ManualClock",
        "MemoryObjectStore",
        "MemoryQueue",
        "MemorySecretStore",
        "MemorySigner",
    ]


def test_state_machines_import_no_io_and_read_no_clock() -> None:
    for name in STATE_MACHINES:
        tree = ast.parse((KERNEL / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                roots = {(node.module or "").split(".")[0]}
            else:
                if isinstance(node, ast.Attribute) and node.attr in ("now", "utcnow", "today"):
                    raise AssertionError(f"{name} reads the clock: .{node.attr}")
                continue
            assert not roots & FORBIDDEN, f"{name} imports {roots & FORBIDDEN}"


def test_states_are_the_values_the_database_stores() -> None:
    schema = (
        Path(__file__).parents[2] / "src/trace_lite/sql/migrations/0001_state.sql"
    ).read_text()
    for state in trace_core.TaskState:
        assert f"'{state.value}'" in schema
    for outcome in trace_core.AttemptOutcome:
        assert f"'{outcome.value}'" in schema
