"""``LambdaInvoker`` / ``LambdaLauncher`` against a local endpoint that speaks Lambda's Invoke
API (moto's Lambda needs Docker to run functions): boto3 → HTTP → a tiny aiohttp fake that
records what it got. The failure path uses the real Dispatcher on Postgres: a failed invoke
leaves the attempt to time out, and the reaper retries it as attempt 2."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from trace_aws._boto import client
from trace_aws.lambda_invoker import LambdaInvoker, LambdaLauncher
from trace_aws.testing import MOTO_ENV, free_port
from trace_core import wire
from trace_core.lifecycle import LeasePolicy, RetryPolicy
from trace_core.testing import MemoryObjectStore, MemoryQueue, MemorySigner
from trace_lite.dispatcher import Dispatcher, open_pool


class FakeLambda:
    def __init__(self) -> None:
        self.invocations: list[dict[str, Any]] = []
        self.configs: list[dict[str, Any]] = []
        self.fail_with: int | None = None
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    async def invoke(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.invocations.append(
            {
                "function": request.match_info["name"],
                "headers": dict(request.headers),
                "body": json.loads(body),
            }
        )
        if self.fail_with:
            return web.json_response(
                {"Type": "Service", "message": "boom"},
                status=self.fail_with,
                headers={"x-amzn-ErrorType": "ServiceException"},
            )
        return web.Response(status=202)

    async def config(self, request: web.Request) -> web.Response:
        self.configs.append(
            {"function": request.match_info["name"], "body": json.loads(await request.read())}
        )
        return web.json_response({"MaximumRetryAttempts": 0})

    async def __aenter__(self) -> FakeLambda:
        app = web.Application()
        app.router.add_post("/2015-03-31/functions/{name}/invocations", self.invoke)
        app.router.add_put("/2019-09-25/functions/{name}/event-invoke-config", self.config)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.runner.cleanup()


@pytest.fixture
async def fake(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeLambda]:
    for k, v in MOTO_ENV.items():
        monkeypatch.setenv(k, v)
    async with FakeLambda() as f:
        yield f


def _invoker(fake: FakeLambda) -> LambdaInvoker:
    lam = client("lambda", endpoint_url=fake.url, max_attempts=1)
    return LambdaInvoker("trace-udf-python", lambda_client=lam)


async def _dispatcher(db_url: str) -> tuple[Dispatcher, Any]:
    pool = await open_pool(db_url, min_size=1, max_size=4)
    d = Dispatcher(
        pool,
        signer=MemorySigner(),
        queue=MemoryQueue("tasks"),
        object_store=MemoryObjectStore(),
        lease=LeasePolicy(lease_s=1.0, heartbeat_s=0.25),
        retry=RetryPolicy(base_s=0.01, cap_s=0.01),
    )
    return d, pool


async def test_launch_invokes_event_with_the_full_payload(db_url: str, fake: FakeLambda) -> None:
    d, pool = await _dispatcher(db_url)
    invoker = _invoker(fake)
    try:
        [info] = await d.create_tasks(
            [
                wire.CreateTaskRequest(
                    operator="udf_python", payload={"bundle_key": "org/x/bundles/f.zip", "n": 1}
                )
            ]
        )
        launcher = LambdaLauncher(d, invoker, MemoryObjectStore())
        claim = await launcher.launch(info.task_id)
        assert claim is not None and claim.attempt == 1
        assert fake.configs == [
            {"function": "trace-udf-python", "body": {"MaximumRetryAttempts": 0}}
        ]
        [inv] = fake.invocations
        assert inv["function"] == "trace-udf-python"
        assert inv["headers"]["X-Amz-Invocation-Type"] == "Event"
        payload = wire.structure(inv["body"], wire.LambdaInvokePayload)
        fetched = await d.fetch(info.task_id, 1)
        # the same shape as task-fetch, plus the attempt's credentials and the bundle URL
        for field in (
            "task_id",
            "org_id",
            "operator",
            "payload",
            "attempt",
            "timeout_s",
            "staging_prefix",
            "max_attempts",
        ):
            assert getattr(payload, field) == getattr(fetched, field), field
        assert payload.capability_token == claim.capability_token
        assert payload.lease_token == claim.lease_token
        assert payload.lease_expires_at == claim.lease_expires_at
        assert "org/x/bundles/f.zip" in payload.bundle_url
        # the capability token is valid for this attempt
        await d.authorize(payload.capability_token, info.task_id, 1)
        # a second launch of the running task does nothing
        assert await launcher.launch(info.task_id) is None
        assert len(fake.invocations) == 1
    finally:
        await invoker.close()
        await pool.close()


async def test_failed_invoke_times_out_and_the_reaper_retries(
    db_url: str, fake: FakeLambda
) -> None:
    import asyncio

    d, pool = await _dispatcher(db_url)
    invoker = _invoker(fake)
    try:
        [info] = await d.create_tasks(
            [wire.CreateTaskRequest(operator="udf_python", max_attempts=3)]
        )
        launcher = LambdaLauncher(d, invoker, MemoryObjectStore())
        fake.fail_with = 500
        first = await launcher.launch(info.task_id)  # the failure is logged, not raised
        assert first is not None and first.attempt == 1
        assert len(fake.invocations) == 1
        task = await d.get_task(info.task_id)
        assert (task["state"], task["attempt"]) == ("running", 1)
        # nobody heartbeats: the lease (1 s) expires, the reaper retries the task
        for _ in range(50):
            await asyncio.sleep(0.1)
            await d.reap_once()
            if (await d.get_task(info.task_id))["state"] == "queued":
                break
        task = await d.get_task(info.task_id)
        assert task["state"] == "queued"
        assert [(a["attempt"], a["outcome"]) for a in task["attempts"]] == [(1, "timed_out")]
        fake.fail_with = None
        second = await launcher.launch(info.task_id)
        assert second is not None and second.attempt == 2
        assert wire.structure(fake.invocations[-1]["body"], wire.LambdaInvokePayload).attempt == 2
        with pytest.raises(Exception):  # noqa: B017 - the stale attempt's token is refused
            await d.authorize(first.capability_token, info.task_id, 2)
    finally:
        await invoker.close()
        await pool.close()


async def test_runtime_lambda_tasks_are_invoked_by_the_outbox_publisher(
    fake: FakeLambda, db_url: str
) -> None:
    """A ``runtime: lambda`` task is never put on the worker queue: the Dispatcher's outbox
    publisher claims it and invokes the function with the full payload."""
    d, pool = await _dispatcher(db_url)
    try:
        d.launcher = LambdaLauncher(d, _invoker(fake), MemoryObjectStore())
        (lam,) = await d.create_tasks(
            [wire.CreateTaskRequest(operator="udf", runtime="lambda", payload={"x": 1})]
        )
        (wrk,) = await d.create_tasks([wire.CreateTaskRequest(operator="noop")])
        assert await d.publish_outbox_once() == 2
        assert [i["body"]["task_id"] for i in fake.invocations] == [lam.task_id]
        body = fake.invocations[0]["body"]
        assert body["attempt"] == 1 and body["payload"] == {"x": 1} and body["capability_token"]
        assert fake.invocations[0]["headers"]["X-Amz-Invocation-Type"] == "Event"
        assert d.queue is not None
        msgs = await d.queue.receive(max_messages=10)
        assert [json.loads(m.body)["task_id"] for m in msgs] == [wrk.task_id]
        assert (await d.get_task(lam.task_id))["state"] == "running"
    finally:
        await pool.close()


async def test_lambda_tasks_wait_in_the_outbox_without_a_launcher(db_url: str) -> None:
    d, pool = await _dispatcher(db_url)
    try:
        (lam,) = await d.create_tasks([wire.CreateTaskRequest(operator="udf", runtime="lambda")])
        assert await d.publish_outbox_once() == 0
        task = await d.get_task(lam.task_id)
        assert task["state"] == "queued" and task["attempts"] == []
    finally:
        await pool.close()
