"""The Lite launcher and the AWS launcher send the same invoke payload: both claim through a
real Dispatcher on Postgres, both payloads are built by ``trace_core.udf.invoke_payload``, and
they carry the same fields with the same values for the same task shape."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from trace_aws._boto import client
from trace_aws.lambda_invoker import LambdaInvoker, LambdaLauncher
from trace_aws.testing import MOTO_ENV, free_port
from trace_core import udf, wire
from trace_core.lifecycle import LeasePolicy, RetryPolicy
from trace_core.testing import MemoryObjectStore, MemoryQueue, MemorySigner
from trace_lite.dispatcher import Dispatcher, open_pool
from trace_lite.udf import RunnerInvoker, UdfLauncher


class Recorder:
    """Speaks Lambda's Invoke API (what boto3 sends and what the Lite runner serves)."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    async def invoke(self, request: web.Request) -> web.Response:
        self.bodies.append(json.loads(await request.read()))
        self.headers.append(dict(request.headers))
        return web.Response(status=202)

    async def config(self, request: web.Request) -> web.Response:
        return web.json_response({"MaximumRetryAttempts": 0})

    async def __aenter__(self) -> Recorder:
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
async def recorders(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[Recorder, Recorder]]:
    for k, v in MOTO_ENV.items():
        monkeypatch.setenv(k, v)
    async with Recorder() as aws, Recorder() as lite:
        yield aws, lite


async def test_lite_and_aws_launchers_send_the_same_payload(
    db_url: str, recorders: tuple[Recorder, Recorder]
) -> None:
    aws, lite = recorders
    pool = await open_pool(db_url, min_size=1, max_size=4)
    store = MemoryObjectStore()
    d = Dispatcher(
        pool,
        signer=MemorySigner(),
        queue=MemoryQueue("tasks"),
        object_store=store,
        lease=LeasePolicy(lease_s=30.0, heartbeat_s=7.5),
        retry=RetryPolicy(base_s=0.01, cap_s=0.01),
    )
    invoker = LambdaInvoker(
        "trace-udf", lambda_client=client("lambda", endpoint_url=aws.url, max_attempts=1)
    )
    runner = RunnerInvoker(lite.url)
    bundle = {"name": "blocks", "digest": "sha256:" + "cd" * 32}
    try:
        infos = await d.create_tasks(
            [
                wire.CreateTaskRequest(
                    operator="udf",
                    runtime="lambda",
                    payload={"bundle": bundle, "n": 7},
                    max_attempts=4,
                    timeout_s=45,
                    read_datasets=[],
                )
                for _ in range(2)
            ]
        )
        claim_aws = await LambdaLauncher(d, invoker, store).launch(infos[0].task_id)
        claim_lite = await UdfLauncher(d, runner, store).launch(infos[1].task_id)
        assert claim_aws is not None and claim_lite is not None
        [body_aws], [body_lite] = aws.bodies, lite.bodies
        assert aws.headers[0]["X-Amz-Invocation-Type"] == "Event"
        assert lite.headers[0]["X-Amz-Invocation-Type"] == "Event"
        # the same fields; the same values except the task's and the attempt's own
        assert sorted(body_aws) == sorted(body_lite)
        per_attempt = {"task_id", "capability_token", "lease_token", "lease_expires_at"}
        per_task = {"staging_prefix", "bundle_url"}
        for field in set(body_aws) - per_attempt - per_task:
            assert body_aws[field] == body_lite[field], field
        # each is exactly what the one builder makes of the task and its claim
        for body, claim, info in (
            (body_aws, claim_aws, infos[0]),
            (body_lite, claim_lite, infos[1]),
        ):
            task = await d.fetch(info.task_id, claim.attempt)
            expected = udf.invoke_payload(task, claim, body["bundle_url"])
            assert wire.structure(body, wire.LambdaInvokePayload) == expected
            key = udf.bundle_key(task)
            assert key == f"org/{task.org_id}/bundles/blocks/sha256-{'cd' * 32}.zip"
            assert key in body["bundle_url"]
    finally:
        await invoker.close()
        await runner.close()
        await pool.close()
