"""``/v1/orgs/{org}/alert-destinations`` over HTTP on real Postgres: create, list, get, update,
delete; admins write, members read, outsiders see no org; every bad input (each SSRF address
form, each field rule) is 422 naming the field with no row and no secret written; secrets are
write-only (stored, never in an answer)."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import psycopg
import pytest
from aiohttp.test_utils import TestClient, TestServer

from trace_core.secret_names import org_prefix
from trace_core.testing import MemoryObjectStore, MemoryQueue, MemorySecretStore, MemorySigner
from trace_lite.datasets import Datasets
from trace_lite.dispatcher import Dispatcher, open_pool
from trace_lite.users import LocalUserIssuer, UserAuthenticator
from trace_servers.app import make_app

ORG = "acme"
PLATFORM = "p" * 32
BASE = f"/v1/orgs/{ORG}/alert-destinations"
SECRET = "whsec_" + base64.b64encode(b"k" * 32).decode()
PUBLIC = "https://93.184.215.14/hook"  # an address literal: no DNS needed, globally routable


@attrs.define
class Api:
    client: TestClient[Any, Any]
    secrets: MemorySecretStore
    db_url: str
    headers: dict[str, dict[str, str]]

    async def call(self, method: str, path: str, who: str, **kw: Any) -> tuple[int, Any]:
        r = await self.client.request(method, path, headers=self.headers[who], **kw)
        return r.status, await r.json()

    def rows(self) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.db_url, autocommit=True) as conn:
            return conn.execute(
                "SELECT name, url, enabled, deleted_at IS NOT NULL FROM alert_destinations "
                "ORDER BY created_at"
            ).fetchall()

    async def stored_secrets(self) -> list[str]:
        with psycopg.connect(self.db_url, autocommit=True) as conn:
            (org_id,) = conn.execute(
                "SELECT org_id::text FROM orgs WHERE name = %s", (ORG,)
            ).fetchone() or ("",)
        return await self.secrets.list(org_prefix(org_id))


@pytest.fixture
async def api(db_url: str, tmp_path: Path) -> AsyncIterator[Api]:
    pool = await open_pool(db_url, min_size=1, max_size=6)
    d = Dispatcher(
        pool, signer=MemorySigner(), queue=MemoryQueue("t"), object_store=MemoryObjectStore()
    )
    ds = Datasets(pool, object_store=MemoryObjectStore())
    await ds.set_member(None, ORG, "ada", ["admin"])
    await ds.set_member(None, ORG, "bob", [])
    await ds.set_member(None, "other", "eve", ["admin"])
    issuer = LocalUserIssuer.init(tmp_path / "keys")
    auth = UserAuthenticator({issuer.key.kid: issuer.key})
    headers = {
        who: {"Authorization": f"Bearer {issuer.token(who)}"} for who in ("ada", "bob", "eve")
    }
    headers["nobody"] = {}
    secrets = MemorySecretStore()
    app = make_app(d, platform_token=PLATFORM, user_auth=auth, secret_store=secrets)
    try:
        async with TestClient(TestServer(app)) as client:
            yield Api(client, secrets, db_url, headers)
    finally:
        await pool.close()


def new(**kw: Any) -> dict[str, Any]:
    return {"name": "ops", "url": PUBLIC, "signing_secret": SECRET, **kw}


BAD_CREATES = [
    (new(name="Ops Team"), "name"),
    (new(kind="sms"), "kind"),
    (new(url="ftp://93.184.215.14/x"), "url"),
    (new(url="https://" + "a" * 2100 + ".com/"), "url"),
    (new(url="http://user:pw@93.184.215.14/"), "url"),
    (new(url="http://127.0.0.1/hook"), "url"),
    (new(url="http://localhost/hook"), "url"),
    (new(url="http://2130706433/hook"), "url"),
    (new(url="http://0x7f.0.0.1/hook"), "url"),
    (new(url="http://0177.0.0.1/hook"), "url"),
    (new(url="http://10.1.2.3/hook"), "url"),
    (new(url="http://100.64.0.1/hook"), "url"),
    (new(url="http://169.254.169.254/latest/meta-data"), "url"),
    (new(url="http://[::1]/hook"), "url"),
    (new(url="http://[::ffff:169.254.169.254]/"), "url"),
    (new(url="http://[64:ff9b::a9fe:a9fe]/"), "url"),
    (new(url="http://[fd00:ec2::254]/"), "url"),
    (new(url="http://224.0.0.1/"), "url"),
    (new(url="http://0.0.0.0/"), "url"),
    ({"name": "ops", "url": PUBLIC}, "signing_secret"),
    (new(signing_secret="whsec_!!notbase64"), "signing_secret"),
    (new(signing_secret="whsec_" + base64.b64encode(b"short").decode()), "signing_secret"),
    (new(signing_secret="secret"), "signing_secret"),
    (new(kind="pagerduty"), "routing_key"),
    (new(routing_key="R0123456789abcdef"), "routing_key"),
    (new(kind="pagerduty", routing_key="bad key!"), "routing_key"),
    (new(extra=1), "extra"),
    (new(name=7), "name"),
]


@pytest.mark.parametrize(("body", "field"), BAD_CREATES)
async def test_bad_input_is_422_with_the_field_and_writes_nothing(
    api: Api, body: dict[str, Any], field: str
) -> None:
    status, answer = await api.call("POST", BASE, "ada", json=body)
    assert status == 422, answer
    assert answer["error"] == "validation_failed" and answer["message"]
    assert answer["field"] == field
    assert api.rows() == [] and await api.stored_secrets() == []


async def test_access_admins_write_members_read_outsiders_see_no_org(api: Api) -> None:
    assert (await api.call("POST", BASE, "nobody", json=new()))[0] == 401
    status, answer = await api.call("POST", BASE, "bob", json=new())
    assert (status, answer["error"]) == (403, "forbidden")
    status, answer = await api.call("POST", BASE, "eve", json=new())
    assert (status, answer["error"]) == (404, "not_found")
    assert api.rows() == [] and await api.stored_secrets() == []
    assert (await api.call("POST", BASE, "ada", json=new()))[0] == 201
    assert (await api.call("GET", BASE, "bob"))[0] == 200
    assert (await api.call("GET", f"{BASE}/ops", "eve"))[0] == 404
    assert (await api.call("DELETE", f"{BASE}/ops", "bob"))[0] == 403
    assert (await api.call("PATCH", f"{BASE}/ops", "bob", json={"enabled": False}))[0] == 403


async def test_create_list_get_update_delete_with_write_only_secrets(api: Api) -> None:
    status, created = await api.call("POST", BASE, "ada", json=new())
    assert status == 201
    assert set(created) == {"destination_id", "name", "kind", "url", "enabled", "disabled_reason"}
    (secret_name,) = await api.stored_secrets()
    assert await api.secrets.get(secret_name) == SECRET.encode()
    status, pd = await api.call(
        "POST", BASE, "ada", json={"name": "pager", "url": PUBLIC, "kind": "pagerduty",
                                   "routing_key": "R0123456789abcdef"},
    )  # fmt: skip
    assert status == 201 and pd["kind"] == "pagerduty"
    assert len(await api.stored_secrets()) == 3  # pager: a generated signing secret + its key
    # a second "ops" is a conflict, and its secret is not left behind
    status, answer = await api.call("POST", BASE, "ada", json=new())
    assert (status, answer["error"]) == (409, "conflict")
    assert len(await api.stored_secrets()) == 3
    status, listed = await api.call("GET", BASE, "bob")
    assert [d["name"] for d in listed["destinations"]] == ["ops", "pager"]
    every_answer = str([created, pd, listed])
    assert "whsec_" not in every_answer and "R0123456789abcdef" not in every_answer
    assert "secret" not in every_answer
    # update: a refused URL changes nothing; then disable, rotate the secret, rename
    status, answer = await api.call(
        "PATCH", f"{BASE}/ops", "ada", json={"url": "http://127.1/", "enabled": False}
    )
    assert (status, answer["field"]) == (422, "url")
    status, answer = await api.call("PATCH", f"{BASE}/ops", "ada", json={})
    assert (status, answer["error"]) == (422, "validation_failed")
    assert api.rows()[0] == ("ops", PUBLIC, True, False)
    rotated = "whsec_" + base64.b64encode(b"n" * 32).decode()
    status, updated = await api.call(
        "PATCH", f"{BASE}/ops", "ada",
        json={"enabled": False, "signing_secret": rotated, "name": "ops2"},
    )  # fmt: skip
    assert status == 200 and (updated["enabled"], updated["name"]) == (False, "ops2")
    assert "whsec_" not in str(updated)
    assert await api.secrets.get(secret_name) == rotated.encode()
    assert (await api.call("GET", f"{BASE}/ops", "bob"))[0] == 404
    status, one = await api.call("GET", f"{BASE}/ops2", "bob")
    assert status == 200 and one["disabled_reason"] == "disabled through the API"
    status, answer = await api.call("GET", f"{BASE}/Not%20A%20Name", "bob")
    assert (status, answer["field"]) == (422, "destination")
    # delete: gone from the API, the row kept for history, its secrets removed, name free
    status, answer = await api.call("DELETE", f"{BASE}/ops2", "ada")
    assert (status, answer) == (200, {"deleted": "ops2", "deliveries_disabled": 0})
    assert (await api.call("GET", f"{BASE}/ops2", "bob"))[0] == 404
    assert (await api.call("DELETE", f"{BASE}/ops2", "ada"))[0] == 404
    assert secret_name not in await api.stored_secrets()
    assert ("ops2", PUBLIC, False, True) in api.rows()
    assert (await api.call("POST", BASE, "ada", json=new(name="ops2")))[0] == 201
