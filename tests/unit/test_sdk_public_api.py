"""Pin ``trace_sdk``'s public face, and keep its dependencies pointing one way."""

from __future__ import annotations

import ast
from pathlib import Path

import trace_sdk

SDK = Path(trace_sdk.__file__).parent


def test_trace_sdk_public_names() -> None:
    assert sorted(trace_sdk.__all__) == [
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
    for name in trace_sdk.__all__:
        assert hasattr(trace_sdk, name)


def test_trace_sdk_imports_neither_lite_nor_the_servers() -> None:
    for path in SDK.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                roots = {node.module.split(".")[0]}
            elif isinstance(node, ast.Import):
                roots = {a.name.split(".")[0] for a in node.names}
            else:
                continue
            assert not roots & {"trace_lite", "trace_aws", "trace_servers", "psycopg", "boto3"}, (
                path.name,
                roots,
            )


def test_every_task_surface_implements_the_port() -> None:
    from trace_core.ports import TaskSurface
    from trace_core.testing import FakeTaskSurface
    from trace_lite.task_surface import InProcessTaskSurface

    assert isinstance(trace_sdk.DispatcherClient("http://127.0.0.1:1"), TaskSurface)
    assert isinstance(FakeTaskSurface(lambda call: None), TaskSurface)
    assert isinstance(InProcessTaskSurface(object()), TaskSurface)  # type: ignore[arg-type]
