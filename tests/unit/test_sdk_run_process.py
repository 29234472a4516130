"""``TaskContext.run_process``: a child gets the minimal environment, the attempt's pool-slot
``env`` (an RPC endpoint and key, say) and the caller's ``env`` -- never the worker's own."""

from __future__ import annotations

import os

import pytest

from trace_core import wire
from trace_core.testing import FakeTaskSurface, TaskCall
from trace_sdk import TaskContext

TASK = "6b0c6a2e-7f1e-4e55-9e8f-1a2b3c4d5e6f"


def _unused(call: TaskCall) -> object:
    raise AssertionError(f"no task-surface call expected, got {call!r}")


def _ctx(env: dict[str, str]) -> TaskContext:
    task = wire.TaskPayload(
        task_id=TASK,
        org_id="acme",
        job_id=None,
        operator="spawn",
        payload={},
        status="running",
        attempt=1,
        max_attempts=3,
        timeout_s=60,
        staging_prefix="staging/acme/t/1/",
    )
    fence = wire.FenceFields(TASK, 1, TASK)
    return TaskContext(task, 1, FakeTaskSurface(_unused), None, fence, ["token"], env=env)


def _names(out: bytes) -> dict[str, str]:
    return dict(line.split("=", 1) for line in out.decode().splitlines() if "=" in line)


async def test_the_slot_env_and_the_callers_env_reach_the_child(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TRACE_DATABASE_URL", "postgresql://secret")
    ctx = _ctx({"RPC_URL": "http://127.0.0.1:8545/key-a", "RPC_KEY": "a"})
    code, out = await ctx.run_process(["env"], env={"RPC_KEY": "override", "EXTRA": "1"})
    assert code == 0
    seen = _names(out)
    assert seen["RPC_URL"] == "http://127.0.0.1:8545/key-a"
    assert seen["RPC_KEY"] == "override"  # the caller's env wins over the slot's
    assert seen["EXTRA"] == "1"
    assert "TRACE_DATABASE_URL" not in seen  # the worker's own settings never pass
    assert os.environ["TRACE_DATABASE_URL"] == "postgresql://secret"


async def test_a_task_without_a_pool_slot_gets_only_the_minimal_environment() -> None:
    code, out = await _ctx({}).run_process(["env"])
    assert code == 0
    assert set(_names(out)) <= {"PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "HOME"}
