"""The one launcher of ``runtime: lambda`` tasks over an ``Invoker``: what it claims with, what it
sends, what it does when the claim is refused or the invoke fails. A recording Dispatcher stands
in for the real one (the Postgres path is ``tests/udf/test_invoke_payload.py`` and
``tests/integration/test_aws_lambda.py``)."""

from __future__ import annotations

import json
import logging

import pytest

from trace_core import errors, udf, wire
from trace_core.testing import MemoryObjectStore
from trace_lite.invoke_launcher import MAX_EVENT_PAYLOAD, InvokeLauncher, event_body

TASK_ID = "00000000-0000-4000-8000-000000000001"
BUNDLE = {"name": "blocks", "digest": "sha256:" + "cd" * 32}


def _task(payload: dict[str, object]) -> wire.TaskPayload:
    return wire.TaskPayload(
        task_id=TASK_ID,
        org_id="org-1",
        job_id=None,
        operator="udf",
        payload=payload,
        status="running",
        attempt=1,
        max_attempts=3,
        timeout_s=60,
        staging_prefix=f"staging/{TASK_ID}/1/",
    )


CLAIM = wire.ClaimResponse(
    task_id=TASK_ID,
    attempt=1,
    lease_token="lease-1",
    lease_expires_at="2026-12-01T00:00:30+00:00",
    capability_token="cap-1",
    heartbeat_interval_s=7.5,
)


class RecordingDispatcher:
    def __init__(self, task: wire.TaskPayload, refuse: errors.TraceError | None = None) -> None:
        self.task = task
        self.refuse = refuse
        self.claimed_by: list[str] = []

    async def claim(self, task_id: str, worker_id: str) -> wire.ClaimResponse:
        if self.refuse is not None:
            raise self.refuse
        self.claimed_by.append(worker_id)
        return CLAIM

    async def fetch(self, task_id: str, attempt: int | None = None) -> wire.TaskPayload:
        assert attempt == CLAIM.attempt
        return self.task


class RecordingInvoker:
    def __init__(self, fail: errors.TraceError | None = None) -> None:
        self.fail = fail
        self.sent: list[wire.LambdaInvokePayload] = []

    @property
    def worker_id(self) -> str:
        return "test-invoker:fn"

    async def invoke(self, payload: wire.LambdaInvokePayload) -> None:
        if self.fail is not None:
            raise self.fail
        self.sent.append(payload)


async def test_launch_claims_as_the_invoker_and_sends_the_one_builders_event() -> None:
    store = MemoryObjectStore()
    dispatcher = RecordingDispatcher(_task({"bundle": BUNDLE}))
    invoker = RecordingInvoker()
    claim = await InvokeLauncher(dispatcher, invoker, store).launch(TASK_ID)
    assert claim == CLAIM
    assert dispatcher.claimed_by == ["test-invoker:fn"]
    [sent] = invoker.sent
    url = await store.signed_url(udf.bundle_key(dispatcher.task), method="GET", expires_in=900)
    assert sent == udf.invoke_payload(dispatcher.task, CLAIM, url)


@pytest.mark.parametrize(
    "refusal", [errors.TaskNotClaimable(), errors.TaskCanceled(), errors.NotFound()]
)
async def test_an_unclaimable_task_is_not_invoked(refusal: errors.TraceError) -> None:
    invoker = RecordingInvoker()
    launcher = InvokeLauncher(
        RecordingDispatcher(_task({}), refuse=refusal), invoker, MemoryObjectStore()
    )
    assert await launcher.launch(TASK_ID) is None
    assert invoker.sent == []


async def test_a_failed_claim_is_raised() -> None:
    launcher = InvokeLauncher(
        RecordingDispatcher(_task({}), refuse=errors.Unavailable()),
        RecordingInvoker(),
        MemoryObjectStore(),
    )
    with pytest.raises(errors.Unavailable):
        await launcher.launch(TASK_ID)


async def test_a_failed_invoke_is_logged_and_the_claim_returned(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Nothing is undone: the attempt stays leased, times out, and the reaper retries it."""
    invoker = RecordingInvoker(fail=errors.Unavailable("the target answered 500"))
    launcher = InvokeLauncher(
        RecordingDispatcher(_task({"bundle": BUNDLE})), invoker, MemoryObjectStore()
    )
    with caplog.at_level(logging.WARNING, logger="trace.launcher"):
        assert await launcher.launch(TASK_ID) == CLAIM
    [record] = caplog.records
    assert record.__dict__["worker_id"] == "test-invoker:fn"
    assert "answered 500" in record.__dict__["error"]


def test_event_body_refuses_events_over_the_limit() -> None:
    def event(size: int) -> wire.LambdaInvokePayload:
        task = _task({"bundle": BUNDLE, "blob": "x" * size})
        return udf.invoke_payload(task, CLAIM, "memory://bundle")

    small = event_body(event(1000))
    assert json.loads(small) == wire.unstructure(event(1000))
    with pytest.raises(errors.PayloadTooLarge):
        event_body(event(MAX_EVENT_PAYLOAD))
