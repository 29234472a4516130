"""The worker runs against any ``TaskSurface``: here the one-function fake (no HTTP, no
subprocess, no database). A fake Dispatcher in a few lines: grants every claim, records the
attempt calls, answers completions."""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

import pytest

from trace_core import errors, wire
from trace_core.testing import FakeTaskSurface, FetchRequest, MemoryQueue, TaskCall
from trace_sdk import NonRetryableError, TaskContext, Worker, child_env, take_platform_token

LEASE = "00000000-0000-4000-8000-00000000aaaa"


class FakeDispatcher:
    """Grants claims of tasks it knows, keeps their completions."""

    def __init__(self, tasks: dict[str, tuple[str, dict[str, Any]]]) -> None:
        self.tasks = tasks  # task id -> (operator, payload)
        self.completed: dict[str, wire.CompleteRequest] = {}
        self.events: list[wire.EventsRequest] = []
        self.tokens: list[str | None] = []
        self.refuse_completion: type[errors.TraceError] | None = None
        self.done = asyncio.Event()

    def __call__(self, call: TaskCall) -> Any:
        req = call.request
        self.tokens.append(call.capability_token)
        if isinstance(req, wire.ClaimBatchRequest):
            return wire.ClaimBatchResponse(
                claims=[self._grant(t) for t in req.task_ids if t in self.tasks],
                refused=[
                    wire.ClaimRefusal(t, "not_found", "no such task")
                    for t in req.task_ids
                    if t not in self.tasks
                ],
            )
        if isinstance(req, wire.EventsRequest):
            self.events.append(req)
            return wire.EventsResponse(accepted=len(req.events), duplicates=0)
        if isinstance(req, wire.CompleteRequest):
            if self.refuse_completion is not None:
                self.done.set()
                raise self.refuse_completion("refused")
            self.completed[req.task_id] = req
            if len(self.completed) == len(self.tasks):
                self.done.set()
            return wire.CompleteResponse(req.task_id, req.attempt, "completed", False)
        if isinstance(req, FetchRequest):
            raise errors.NotFound("the batch claim carries the payload")
        raise AssertionError(f"unexpected call {call}")

    def _grant(self, task_id: str) -> wire.ClaimGrantOut:
        operator, payload = self.tasks[task_id]
        claim = wire.ClaimResponse(task_id, 1, LEASE, "2030-01-01T00:00:00Z", f"tok-{task_id}", 60)
        task = wire.TaskPayload(
            task_id, "org", None, operator, payload, "running", 1, 3, 30, f"p/{task_id}/"
        )
        return wire.ClaimGrantOut(claim=claim, task=task)


def _ids(n: int) -> list[str]:
    return [f"00000000-0000-4000-8000-{i:012d}" for i in range(1, n + 1)]


async def _run(worker: Worker, queue: MemoryQueue, fake: FakeDispatcher) -> None:
    await queue.send([json.dumps({"task_id": t}).encode() for t in fake.tasks])
    stop = asyncio.Event()
    running = asyncio.create_task(worker.run(stop))
    await asyncio.wait_for(fake.done.wait(), 30)
    stop.set()
    await asyncio.wait_for(running, 30)


async def greet(ctx: TaskContext) -> dict[str, Any] | None:
    await ctx.emit([{"key": "hello", "type": "progress", "payload": {}}])
    ctx.final_events.append({"key": "done", "type": "done", "payload": {"n": 1}})
    return {"greeting": f"hello {ctx.payload['name']}"}


async def fail_for_good(ctx: TaskContext) -> dict[str, Any] | None:
    raise NonRetryableError("no")


async def bad_result(ctx: TaskContext) -> Any:
    return ["not", "an", "object"]


async def refused(ctx: TaskContext) -> Any:
    # what a publish into a dataset the task's DAG may not write answers (403)
    raise errors.Forbidden("the task's DAG does not write dataset 'x'", field="batch.dataset")


async def flaky(ctx: TaskContext) -> Any:
    raise errors.Unavailable("database unavailable")


@pytest.mark.parametrize("batch", [True, False])
async def test_the_worker_runs_operators_through_the_fake_surface(batch: bool) -> None:
    a, b, c, d, e, f = _ids(6)
    fake = FakeDispatcher(
        {
            a: ("greet", {"name": "a"}),
            b: ("fail_for_good", {}),
            c: ("no_such_operator", {}),
            d: ("bad_result", {}),
            e: ("refused", {}),
            f: ("flaky", {}),
        }
    )
    queue = MemoryQueue("tasks")
    worker = Worker(
        surface=FakeTaskSurface(fake),
        queue=queue,
        operators={
            "greet": greet,
            "fail_for_good": fail_for_good,
            "bad_result": bad_result,
            "refused": refused,
            "flaky": flaky,
        },
        batch_completions=batch,
        wait_s=0.05,
    )
    await _run(worker, queue, fake)

    ok = fake.completed[a]
    assert (ok.task_id, ok.attempt, ok.lease_token) == (a, 1, LEASE)
    assert (ok.outcome, ok.result) == ("succeeded", {"greeting": "hello a"})
    assert [e.key for e in ok.final_events] == ["done"]
    assert [e.key for [e] in (r.events for r in fake.events)] == ["hello"]
    assert {t for t in fake.tokens if t} == {f"tok-{t}" for t in (a, b, c, d, e, f)}
    for task_id, code in (
        (b, "operator_error"),
        (c, "operator_error"),
        (d, "invalid_outcome"),
        (e, "forbidden"),  # a refusal is not retried: another attempt would be refused too
    ):
        failed = fake.completed[task_id]
        assert (failed.outcome, failed.retryable) == ("failed", False), failed
        assert failed.error is not None and failed.error["code"] == code
    assert fake.completed[e].error is not None
    assert "(batch.dataset)" in fake.completed[e].error["message"]
    again = fake.completed[f]  # a transient error is retried
    assert (again.outcome, again.retryable) == ("failed", True)
    assert worker.stats["succeeded"] == 1 and worker.stats["failed"] == 5
    assert await queue.depth() == 0  # every wake-up acknowledged after its completion


async def test_a_refused_completion_is_matched_by_class_and_the_wakeup_acked() -> None:
    [a] = _ids(1)
    fake = FakeDispatcher({a: ("greet", {"name": "a"})})
    fake.refuse_completion = errors.LeaseLost
    queue = MemoryQueue("tasks")
    worker = Worker(
        surface=FakeTaskSurface(fake), queue=queue, operators={"greet": greet}, wait_s=0.05
    )
    await _run(worker, queue, fake)
    assert worker.stats["lease_lost"] == 1 and worker.stats["succeeded"] == 0
    assert await queue.depth() == 0


def test_the_platform_credential_leaves_the_environment_and_children_get_a_minimal_one() -> None:
    environ = {"TRACE_PLATFORM_TOKEN": "secret", "PATH": "/bin", "AWS_SECRET_ACCESS_KEY": "x"}
    assert take_platform_token(environ) == "secret"
    assert "TRACE_PLATFORM_TOKEN" not in environ
    env = child_env({"MODE": "1"}, environ=environ)
    assert set(env) == {"PATH", "HOME", "MODE"}
    with pytest.raises(ValueError):
        child_env({"TRACE_PLATFORM_TOKEN": "secret"})


async def test_run_process_starts_children_with_the_minimal_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TRACE_DATABASE_URL", "postgresql://secret@db/trace")
    ctx = TaskContext(None, 1, None, None, None, [""])  # type: ignore[arg-type]
    code, out = await ctx.run_process(["env"], env={"EXTRA": "yes"})
    names = {line.split("=", 1)[0] for line in out.decode().splitlines()}
    assert code == 0
    assert names <= {"PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "HOME", "EXTRA", "PWD"}
    assert "EXTRA" in names and "TRACE_DATABASE_URL" not in names
    assert "TRACE_DATABASE_URL" in os.environ  # the worker's own environment is untouched
