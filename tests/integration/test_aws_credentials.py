"""``/v1/task/credentials`` on the real Dispatcher (Postgres) with ``StsCredentialMinter``
talking to a moto server over HTTP: the minted session policy is exactly the attempt's grant,
a prefix outside it is refused before any AWS call, the route is fenced, and Lite (no minter)
answers ``not_found``."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from trace_aws.credentials import StsCredentialMinter
from trace_aws.session_policy import grant_for_attempt, session_policy
from trace_core.testing import MemoryObjectStore, MemoryQueue, MemorySigner
from trace_lite.dispatcher import Dispatcher, open_pool
from trace_servers.app import make_app

PLATFORM = "platform-token-for-tests-0123456789"
AUTH = {"Authorization": f"Bearer {PLATFORM}"}
ROLE = "arn:aws:iam::123456789012:role/trace-task-data"
INPUTS = ["org/ORG/dataset/blocks/version/3/"]


@pytest.fixture
async def minter(moto_server: Any) -> AsyncIterator[tuple[StsCredentialMinter, list[dict]]]:
    m = StsCredentialMinter(ROLE, "trace-data", endpoint_url=moto_server.url)
    calls: list[dict[str, Any]] = []
    m._sts.meta.events.register(
        "provide-client-params.sts.AssumeRole", lambda params, **_: calls.append(dict(params))
    )
    yield m, calls
    await m.close()


async def _client(db_url: str, minter: Any) -> tuple[TestClient, Any]:
    pool = await open_pool(db_url, min_size=1, max_size=4)
    d = Dispatcher(
        pool, signer=MemorySigner(), queue=MemoryQueue("tasks"), object_store=MemoryObjectStore()
    )
    client = TestClient(TestServer(make_app(d, platform_token=PLATFORM, credential_minter=minter)))
    await client.start_server()
    return client, pool


async def _claim(client: TestClient, payload: dict[str, Any]) -> dict[str, Any]:
    r = await client.post(
        "/internal/admin/tasks",
        headers=AUTH,
        json={"operator": "noop", "org": "acme", "payload": payload},
    )
    task = await r.json()
    claim = await (
        await client.post("/internal/task-claim", headers=AUTH, json={"task_id": task["task_id"]})
    ).json()
    claim["org_id"] = task["org_id"]
    return claim


def _fence(claim: dict[str, Any]) -> dict[str, Any]:
    return {k: claim[k] for k in ("task_id", "attempt", "lease_token")}


async def test_minted_credentials_carry_exactly_the_grant(db_url: str, minter: Any) -> None:
    m, calls = minter
    client, pool = await _client(db_url, m)
    try:
        # the org id is only known after the first task: create one to learn it
        probe = await _claim(client, {})
        org = probe["org_id"]
        inputs = [p.replace("ORG", org) for p in INPUTS]
        claim = await _claim(client, {"input_prefixes": inputs})
        cap = {"X-Trace-Task-Capability": claim["capability_token"]}
        r = await client.post("/v1/task/credentials", json=_fence(claim), headers=cap)
        assert r.status == 200, await r.text()
        body = await r.json()
        assert body["access_key_id"] and body["secret_access_key"] and body["session_token"]
        assert body["bucket"] == "trace-data"
        assert body["read_prefixes"] == inputs
        staging = f"org/{org}/staging/task/{claim['task_id']}/attempt/1/"
        assert body["write_prefix"] == staging
        [call] = calls
        assert call["RoleArn"] == ROLE
        assert call["DurationSeconds"] == 900  # timeout 60 s + 60, raised to STS's minimum
        expected = session_policy(
            grant_for_attempt(
                bucket="trace-data",
                org_id=org,
                task_id=claim["task_id"],
                attempt=1,
                timeout_s=60,
                read_prefixes=inputs,
            )
        )
        assert json.loads(call["Policy"]) == expected
        resources = [r for st in expected["Statement"] for r in st["Resource"]]
        assert resources == [
            f"arn:aws:s3:::trace-data/{inputs[0]}*",
            "arn:aws:s3:::trace-data",
            f"arn:aws:s3:::trace-data/{staging}*",
        ]

        # narrowing inside the grant is fine; anything outside is refused before STS is called
        narrowed = {**_fence(claim), "read_prefixes": [inputs[0] + "part-1/"]}
        r = await client.post("/v1/task/credentials", json=narrowed, headers=cap)
        assert r.status == 200 and (await r.json())["read_prefixes"] == narrowed["read_prefixes"]
        assert len(calls) == 2
        for outside, status in (
            (f"org/{org}/dataset/blocks/version/4/", 403),
            (f"org/{org}/dataset/", 403),
            ("org/other/dataset/x/", 403),
            (f"org/{org}/dataset/*/", 422),
        ):
            r = await client.post(
                "/v1/task/credentials",
                headers=cap,
                json={**_fence(claim), "read_prefixes": [outside]},
            )
            assert r.status == status, (outside, await r.text())
        assert len(calls) == 2
        # a task whose own inputs point outside its org gets nothing either
        bad = await _claim(client, {"input_prefixes": ["org/someone-else/dataset/x/"]})
        r = await client.post(
            "/v1/task/credentials",
            json=_fence(bad),
            headers={"X-Trace-Task-Capability": bad["capability_token"]},
        )
        assert r.status == 403 and (await r.json())["error"] == "forbidden"
        assert len(calls) == 2
    finally:
        await client.close()
        await pool.close()


async def test_credentials_are_fenced_and_authenticated(db_url: str, minter: Any) -> None:
    m, calls = minter
    client, pool = await _client(db_url, m)
    try:
        claim = await _claim(client, {})
        cap = {"X-Trace-Task-Capability": claim["capability_token"]}
        r = await client.post("/v1/task/credentials", json=_fence(claim))
        assert r.status == 401
        wrong = {**_fence(claim), "lease_token": "00000000-0000-4000-8000-000000000000"}
        r = await client.post("/v1/task/credentials", json=wrong, headers=cap)
        assert r.status == 409 and (await r.json())["error"] == "lease_lost"
        done = await client.post("/v1/task/complete", json=_fence(claim), headers=cap)
        assert done.status == 200
        r = await client.post("/v1/task/credentials", json=_fence(claim), headers=cap)
        assert r.status == 409 and (await r.json())["error"] == "lease_lost"
        assert calls == []
    finally:
        await client.close()
        await pool.close()


async def test_lite_dispatcher_has_no_minter(db_url: str) -> None:
    client, pool = await _client(db_url, None)
    try:
        claim = await _claim(client, {})
        r = await client.post(
            "/v1/task/credentials",
            json=_fence(claim),
            headers={"X-Trace-Task-Capability": claim["capability_token"]},
        )
        assert r.status == 404 and (await r.json())["error"] == "not_found"
    finally:
        await client.close()
        await pool.close()
