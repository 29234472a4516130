"""Who may read, overwrite and purge, on real Postgres: every cell of the matrix, plus the user
API over HTTP with user JWTs (and a capability token never passing for one)."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from trace_core import errors
from trace_core.access import Caller, UserCaller
from trace_core.testing import MemoryObjectStore, MemoryQueue, MemorySigner
from trace_core.token import issue_claims
from trace_lite.datasets import Datasets
from trace_lite.dispatcher import Dispatcher, open_pool
from trace_lite.users import LocalUserIssuer, UserAuthenticator
from trace_servers.app import make_app

ORG, OTHER, DAG = "acme", "globex", "prices"
PLATFORM = "platform-token-for-tests-0123456789"

#: principal -> {dataset: "RWP" flags}
EXPECTED = {
    "org_admin": {"private": "RWP", "shared": "RWP"},
    "dag_deployer": {"private": "RW-", "shared": "RW-"},
    "member_with_read_role": {"private": "---", "shared": "R--"},
    "member_without_role": {"private": "---", "shared": "---"},
    "other_org_admin": {"private": "---", "shared": "---"},
    "task_with_grant": {"private": "R--", "shared": "R--"},
    "task_without_grant": {"private": "---", "shared": "---"},
}


@pytest.fixture
async def world(db_url: str) -> AsyncIterator[tuple[Datasets, Dispatcher]]:
    pool = await open_pool(db_url, min_size=1, max_size=6)
    d = Dispatcher(
        pool, signer=MemorySigner(), queue=MemoryQueue("t"), object_store=MemoryObjectStore()
    )
    ds = Datasets(pool, object_store=MemoryObjectStore())
    await ds.ensure_dag(ORG, DAG, deployers=["dave"])
    await ds.ensure_dag(OTHER, "other")
    await ds.set_member(None, ORG, "alice", ["admin"])
    await ds.set_member(None, ORG, "dave", [])
    await ds.set_member(None, ORG, "ann", ["analyst"])
    await ds.set_member(None, ORG, "bob", [])
    await ds.set_member(None, OTHER, "eve", ["admin", "analyst"])
    for name, roles in (("private", []), ("shared", ["analyst"])):
        await ds.register(ORG, name, dag=DAG, job="j", read_roles=roles)
        await ds.cutover(None, ORG, DAG, {name: await ds.open_version(None, ORG, name)})
    try:
        yield ds, d
    finally:
        await pool.close()


async def _task_caller(ds: Datasets, d: Dispatcher, grants: dict[str, Any]) -> Caller:
    from trace_core import wire

    org_id = await ds.org_id(ORG)
    (task,) = await d.create_tasks([wire.CreateTaskRequest(operator="x", org=ORG)])
    claims = issue_claims(
        d.token_policy,
        org_id=org_id,
        task_id=task.task_id,
        attempt=1,
        attempt_timeout_s=60,
        now_epoch=int(time.time()),
        jti="j",
        grants=grants,
    )
    token = await d.issuer.encode(claims)
    verified = await d.authorize(token, claims.task_id, 1)  # signature + claims checked
    return ds.task_caller(verified)


async def _caller(ds: Datasets, d: Dispatcher, principal: str) -> Caller:
    users = {
        "org_admin": "alice",
        "dag_deployer": "dave",
        "member_with_read_role": "ann",
        "member_without_role": "bob",
        "other_org_admin": "eve",
    }
    if principal == "other_org_admin":
        # the API refuses her at the door (``user_caller``: "no such org"); the rules must hold
        # for such a caller anyway
        with pytest.raises(errors.NotFound, match="no such org"):
            await ds.user_caller(ORG, "eve")
        return UserCaller("eve", await ds.org_id(ORG), roles=frozenset({"admin"}), member=False)
    if principal in users:
        return await ds.user_caller(ORG, users[principal])
    grants = {"datasets": {"read": ["private", "shared"]}} if principal == "task_with_grant" else {}
    return await _task_caller(ds, d, grants)


@pytest.mark.parametrize("principal", list(EXPECTED))
async def test_permission_matrix(world: tuple[Datasets, Dispatcher], principal: str) -> None:
    ds, d = world
    caller = await _caller(ds, d, principal)
    for dataset, flags in EXPECTED[principal].items():
        # read
        if flags[0] == "R":
            res = await ds.resolve(caller, ORG, [dataset], pin_ttl_s=0)
            assert res.datasets[0].dataset_version
        else:
            with pytest.raises((errors.Forbidden, errors.NotFound)):
                await ds.resolve(caller, ORG, [dataset], pin_ttl_s=0)
        # overwrite: cut the DAG's pointer for this dataset over to a fresh version
        fresh = await ds.open_version(None, ORG, dataset)
        if flags[1] == "W":
            await ds.cutover(caller, ORG, DAG, {dataset: fresh})
            await ds.rollback(caller, ORG, DAG)
        else:
            with pytest.raises((errors.Forbidden, errors.NotFound)):
                await ds.cutover(caller, ORG, DAG, {dataset: fresh})
            with pytest.raises((errors.Forbidden, errors.NotFound)):
                await ds.open_version(caller, ORG, dataset)
        # purge a version that is neither active nor pinned
        spare = await ds.open_version(None, ORG, dataset)
        if flags[2] == "P":
            report = await ds.purge(caller, ORG, dataset, spare)
            assert report.dataset_version == spare
        else:
            with pytest.raises((errors.Forbidden, errors.NotFound)):
                await ds.purge(caller, ORG, dataset, spare)
    # listing shows exactly the readable ones (tasks list nothing they cannot read either)
    listed = (
        {x["dataset"] for x in await ds.list_datasets(caller, ORG)}
        if principal != "other_org_admin"
        else set()
    )
    assert listed == {n for n, f in EXPECTED[principal].items() if f[0] == "R"}


async def test_nothing_crosses_orgs(world: tuple[Datasets, Dispatcher]) -> None:
    ds, _ = world
    eve_home = await ds.user_caller(OTHER, "eve")
    with pytest.raises(errors.NotFound):
        await ds.resolve(eve_home, ORG, ["shared"])  # her admin role is in globex only
    with pytest.raises(errors.NotFound):
        await ds.list_datasets(eve_home, ORG)


@pytest.fixture
async def api(
    world: tuple[Datasets, Dispatcher], tmp_path: Path
) -> AsyncIterator[tuple[TestClient, LocalUserIssuer, Dispatcher]]:
    _, d = world
    issuer = LocalUserIssuer.init(tmp_path / "keys")
    auth = UserAuthenticator({issuer.key.kid: issuer.key})
    async with TestClient(TestServer(make_app(d, platform_token=PLATFORM, user_auth=auth))) as c:
        yield c, issuer, d


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_user_api_over_http(api: tuple[TestClient, LocalUserIssuer, Dispatcher]) -> None:
    c, issuer, _ = api
    alice, bob, ann = (issuer.token(s) for s in ("alice", "bob", "ann"))
    r = await c.get(f"/v1/orgs/{ORG}/datasets", headers=_bearer(alice))
    assert r.status == 200
    assert {x["dataset"] for x in (await r.json())["datasets"]} == {"private", "shared"}
    r = await c.get(f"/v1/orgs/{ORG}/datasets", headers=_bearer(bob))
    assert (await r.json())["datasets"] == []
    r = await c.post(
        f"/v1/orgs/{ORG}/datasets/resolve", headers=_bearer(ann), json={"datasets": ["shared"]}
    )
    body = await r.json()
    assert r.status == 200 and body["datasets"][0]["dataset_version"] and body["pin_id"]
    r = await c.post(
        f"/v1/orgs/{ORG}/datasets/resolve", headers=_bearer(ann), json={"datasets": ["private"]}
    )
    assert r.status == 403 and (await r.json())["error"] == "forbidden"
    r = await c.post(
        f"/v1/orgs/{ORG}/datasets/resolve",
        headers=_bearer(ann),
        json={"datasets": ["shared"], "extra": 1},
    )
    assert r.status == 422 and (await r.json())["field"] == "extra"
    # admin API: members and read_roles; a non-admin is refused
    r = await c.put(
        f"/v1/orgs/{ORG}/members/carol", headers=_bearer(bob), json={"roles": ["admin"]}
    )
    assert r.status == 403
    r = await c.put(
        f"/v1/orgs/{ORG}/members/carol", headers=_bearer(alice), json={"roles": ["analyst"]}
    )
    assert r.status == 200 and (await r.json())["roles"] == ["analyst"]
    r = await c.put(
        f"/v1/orgs/{ORG}/datasets/private/read-roles",
        headers=_bearer(alice),
        json={"read_roles": ["analyst"]},
    )
    assert r.status == 200
    r = await c.post(
        f"/v1/orgs/{ORG}/datasets/resolve", headers=_bearer(ann), json={"datasets": ["private"]}
    )
    assert r.status == 200
    show = await (await c.get(f"/v1/orgs/{ORG}/datasets/private", headers=_bearer(ann))).json()
    assert [v["active"] for v in show["versions"]] == [True]
    assert show["versions"][0]["pins"] == 1
    # purge of the active version: 409
    version = show["versions"][0]["dataset_version"]
    r = await c.post(
        f"/v1/orgs/{ORG}/datasets/private/versions/{version}/purge", headers=_bearer(alice)
    )
    assert r.status == 409


async def test_tokens_never_pass_for_each_other(
    api: tuple[TestClient, LocalUserIssuer, Dispatcher],
) -> None:
    c, issuer, d = api
    claim_token = await d.issuer.encode(
        issue_claims(
            d.token_policy,
            org_id=str(uuid.uuid4()),
            task_id=str(uuid.uuid4()),
            attempt=1,
            attempt_timeout_s=60,
            now_epoch=int(time.time()),
            jti="x",
        )
    )
    for bad in (
        claim_token,
        "not-a-jwt",
        issuer.token("alice", ttl_s=-100),
        issuer.token("alice", extra={"aud": "trace-task"}),
    ):
        r = await c.get(f"/v1/orgs/{ORG}/datasets", headers=_bearer(bad))
        assert r.status == 401, bad
    r = await c.get(f"/v1/orgs/{ORG}/datasets")
    assert r.status == 401
    # a user token is not a capability token
    r = await c.post(
        "/v1/task/heartbeat",
        headers={"X-Trace-Task-Capability": issuer.token("alice")},
        json={"task_id": str(uuid.uuid4()), "attempt": 1, "lease_token": str(uuid.uuid4())},
    )
    assert r.status == 401


async def test_task_reads_exactly_what_its_token_grants_over_http(
    api: tuple[TestClient, LocalUserIssuer, Dispatcher], db_url: str
) -> None:
    """Tasks created with ``read_datasets`` get them as token grants (kept on heartbeat
    renewal); ``/v1/task/resolve`` resolves those and nothing else, for the current attempt."""
    from trace_core import wire

    client, _issuer, d = api
    (granted,) = await d.create_tasks(
        [wire.CreateTaskRequest(operator="x", org=ORG, read_datasets=["private"])]
    )
    (bare,) = await d.create_tasks([wire.CreateTaskRequest(operator="x", org=ORG)])

    async def resolve(claim: wire.ClaimResponse, names: list[str], token: str | None = None):
        fence = {
            "task_id": claim.task_id,
            "attempt": claim.attempt,
            "lease_token": claim.lease_token,
        }
        return await client.post(
            "/v1/task/resolve",
            json={**fence, "datasets": names},
            headers={"X-Trace-Task-Capability": token or claim.capability_token},
        )

    c = await d.claim(granted.task_id)
    claims = await d.authorize(c.capability_token, c.task_id, 1)
    assert claims.grants == {"datasets": {"read": ["private"]}}
    r = await resolve(c, ["private"])
    assert r.status == 200, await r.text()
    body = await r.json()
    assert [x["dataset"] for x in body["datasets"]] == ["private"] and body["pin_id"]
    assert (await resolve(c, ["shared"])).status == 403
    assert (await resolve(c, ["nope"])).status == 404
    renewed = await d.heartbeat(
        wire.HeartbeatRequest(task_id=c.task_id, attempt=1, lease_token=c.lease_token)
    )
    assert (await resolve(c, ["private"], renewed.capability_token)).status == 200

    b = await d.claim(bare.task_id)
    assert (await resolve(b, ["private"])).status == 403
    assert (await resolve(b, ["private"], c.capability_token)).status == 403  # other task's token
    await d.complete(wire.CompleteRequest(task_id=c.task_id, attempt=1, lease_token=c.lease_token))
    r = await resolve(c, ["private"])  # the attempt finished: it reads no more
    assert r.status == 409
    bad = await client.post(
        "/v1/task/resolve",
        json={"datasets": ["private"]},
        headers={"X-Trace-Task-Capability": c.capability_token},
    )
    assert bad.status == 422


async def test_a_task_resolves_in_its_own_org_whatever_its_token_claims(
    world: tuple[Datasets, Dispatcher],
) -> None:
    from trace_core import wire

    ds, d = world
    await ds.register(OTHER, "private", dag="other", job="j")
    await ds.cutover(
        None, OTHER, "other", {"private": await ds.open_version(None, OTHER, "private")}
    )
    (task,) = await d.create_tasks([wire.CreateTaskRequest(operator="x", org=ORG)])

    def claims(org_id: str) -> Any:
        return issue_claims(
            d.token_policy,
            org_id=org_id,
            task_id=task.task_id,
            attempt=1,
            attempt_timeout_s=60,
            now_epoch=int(time.time()),
            jti="j",
            grants={"datasets": {"read": ["private"]}},
        )

    mine = await ds.resolve_for_task(claims(await ds.org_id(ORG)), ["private"], pin_ttl_s=0)
    (resolved,) = mine.datasets
    alice = await ds.user_caller(ORG, "alice")
    assert resolved.dataset_uuid == (await ds.show(alice, ORG, "private"))["dataset_uuid"]
    # a token whose org_id claim names another org never resolves that org's datasets
    with pytest.raises(errors.Unauthenticated):
        await ds.resolve_for_task(claims(await ds.org_id(OTHER)), ["private"], pin_ttl_s=0)
