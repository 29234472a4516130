"""The ObjectStore conformance suite on ``S3ObjectStore`` against a moto server over real HTTP.

moto serves presigned URLs without checking their signature or expiry, so the URLs the store
hands out point at ``PresignGate``: an aiohttp proxy on loopback that checks the SigV4 query
signature (method, path, query, host) with the secret key and the expiry by its own clock, as
S3 does, then forwards to moto. ``advance_clock`` moves the gate's clock. A separate test shows
the URLs work directly against moto with a plain HTTP client.
"""

from __future__ import annotations

import asyncio
import os
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
import yarl
from aiohttp import web

from trace_aws._boto import client
from trace_aws.s3_store import S3ObjectStore
from trace_aws.testing import check_presigned, free_port
from trace_core import errors
from trace_core.testing.conformance.object_store import FetchSigned, ObjectStoreConformance


class PresignGate:
    def __init__(self, upstream: str, secret_key: str) -> None:
        self.upstream = upstream
        self.secret_key = secret_key
        self.offset = 0.0
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.refusals: list[str] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw_path, _, raw_query = request.raw_path.partition("?")
        reason = check_presigned(
            request.method,
            raw_path,
            raw_query,
            request.host,
            self.secret_key,
            time.time() + self.offset,
        )
        if reason is not None:
            self.refusals.append(reason)
            return web.Response(
                status=403,
                text=f"<Error><Code>AccessDenied</Code><Message>{reason}</Message></Error>",
            )
        body = await request.read()
        async with self.session.request(
            request.method,
            yarl.URL(self.upstream + request.raw_path, encoded=True),
            data=body if request.method == "PUT" else None,
        ) as resp:
            return web.Response(status=resp.status, body=await resp.read())

    async def start(self) -> None:
        self.session = aiohttp.ClientSession()
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        await self.runner.cleanup()
        await self.session.close()


@pytest.fixture
async def gate(moto_server: Any) -> AsyncIterator[PresignGate]:
    g = PresignGate(moto_server.url, os.environ["AWS_SECRET_ACCESS_KEY"])
    await g.start()
    yield g
    await g.stop()


@pytest.fixture(scope="module")
def s3(moto_server: Any) -> Any:
    return client("s3", endpoint_url=moto_server.url, signature_version="s3v4")


@pytest.fixture
async def object_store(s3: Any, gate: PresignGate) -> AsyncIterator[S3ObjectStore]:
    bucket = f"trace-{uuid.uuid4().hex[:12]}"
    await asyncio.to_thread(S3ObjectStore.create_bucket, bucket, s3=s3)
    presigner = client("s3", endpoint_url=gate.url, signature_version="s3v4")
    store = S3ObjectStore(bucket, s3=s3, presigner=presigner)
    yield store
    await store.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def fetch_signed(http: aiohttp.ClientSession) -> FetchSigned:
    async def fetch(url: str, method: str, data: bytes | None = None) -> tuple[int, bytes]:
        async with http.request(method, yarl.URL(url, encoded=True), data=data) as resp:
            return resp.status, await resp.read()

    return fetch


@pytest.fixture
def advance_clock(gate: PresignGate) -> Callable[[float], None]:
    def advance(seconds: float) -> None:
        gate.offset += seconds

    return advance


class TestS3ObjectStore(ObjectStoreConformance):
    pass


# -- S3 specifics -------------------------------------------------------------------------------


def _plain(url: str, method: str = "GET", data: bytes | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/octet-stream"}
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


async def test_presigned_urls_work_directly_against_moto(moto_server: Any) -> None:
    bucket = f"direct-{uuid.uuid4().hex[:12]}"
    await asyncio.to_thread(S3ObjectStore.create_bucket, bucket, endpoint_url=moto_server.url)
    store = S3ObjectStore(bucket, endpoint_url=moto_server.url)
    key = "org/1/dataset/blocks/version/3/part-0.parquet"
    put_url = await store.signed_url(key, method="PUT", expires_in=60)
    assert put_url.startswith(moto_server.url)
    assert "X-Amz-Signature=" in put_url and "X-Amz-Expires=60" in put_url
    status, _ = await asyncio.to_thread(_plain, put_url, "PUT", b"parquet bytes")
    assert status == 200
    get_url = await store.signed_url(key, method="GET", expires_in=60)
    assert await asyncio.to_thread(_plain, get_url) == (200, b"parquet bytes")
    info = await store.head(key)
    assert info.size == 13
    await store.close()


async def test_expired_and_tampered_urls_are_refused_over_plain_http(
    object_store: S3ObjectStore, gate: PresignGate
) -> None:
    await object_store.put("org/1/x", b"data")
    url = await object_store.signed_url("org/1/x", method="GET", expires_in=30)
    assert await asyncio.to_thread(_plain, url) == (200, b"data")
    assert (await asyncio.to_thread(_plain, url.replace("org/1/x", "org/1/y")))[0] == 403
    assert (await asyncio.to_thread(_plain, url.replace("X-Amz-Expires=30", "X-Amz-Expires=9999")))[
        0
    ] == 403
    gate.offset += 31
    assert (await asyncio.to_thread(_plain, url))[0] == 403
    assert "expired" in gate.refusals
    assert "signature does not match" in gate.refusals


async def test_root_prefix_keeps_keys_inside_it(moto_server: Any) -> None:
    bucket = f"root-{uuid.uuid4().hex[:12]}"
    await asyncio.to_thread(S3ObjectStore.create_bucket, bucket, endpoint_url=moto_server.url)
    store = S3ObjectStore(bucket, root="trace/", endpoint_url=moto_server.url)
    await store.put("org/1/a", b"1")
    s3 = client("s3", endpoint_url=moto_server.url)
    s3.put_object(Bucket=bucket, Key="outside", Body=b"2")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]]
    assert sorted(keys) == ["outside", "trace/org/1/a"]
    assert [i.key for i in await store.list("")] == ["org/1/a"]
    with pytest.raises(errors.UnsafeKey):
        await store.get("../outside")
    with pytest.raises(errors.ValidationFailed):
        S3ObjectStore(bucket, root="trace", endpoint_url=moto_server.url)
    await store.close()


async def test_missing_bucket_and_dead_endpoint_are_trace_errors(moto_server: Any) -> None:
    store = S3ObjectStore("no-such-bucket-here", endpoint_url=moto_server.url)
    with pytest.raises(errors.NotFound):
        await store.get("a")
    await store.close()
    dead = S3ObjectStore("b", endpoint_url="http://127.0.0.1:9")
    dead._s3.meta.config.retries = {"max_attempts": 0}
    with pytest.raises(errors.Unavailable):
        await dead.put("a", b"x")
    await dead.close()
