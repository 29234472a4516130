"""The ObjectStore conformance suite on LocalObjectStore, with its signed URLs served by a real
aiohttp server on 127.0.0.1 and fetched over real HTTP; plus Lite-specific behaviour."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yarl
from aiohttp import web

from trace_core.errors import Conflict, UnsafeKey
from trace_core.testing.conformance.object_store import FetchSigned, ObjectStoreConformance
from trace_lite.local_store import LocalObjectStore, new_secret, object_routes


class _Clock:
    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        import time

        return time.time() + self.offset


class _Served:
    def __init__(self, store: LocalObjectStore, session: aiohttp.ClientSession) -> None:
        self.store = store
        self.session = session

    async def fetch(
        self, url: str, method: str, data: bytes | None = None, **kw: Any
    ) -> tuple[int, bytes]:
        async with self.session.request(
            method, yarl.URL(url, encoded=True), data=data, **kw
        ) as resp:
            return resp.status, await resp.read()


@pytest.fixture
def clock() -> _Clock:
    return _Clock()


async def _serve(tmp_path: Path, clock: _Clock, **route_kw: Any) -> AsyncIterator[_Served]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    store = LocalObjectStore(
        tmp_path / "store", f"http://127.0.0.1:{port}", new_secret(), clock=clock
    )
    app = web.Application()
    app.add_routes(object_routes(store, **route_kw))
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.SockSite(runner, sock)
    await site.start()
    async with aiohttp.ClientSession() as session:
        yield _Served(store, session)
    await runner.cleanup()


@pytest.fixture
async def served(tmp_path: Path, clock: _Clock) -> AsyncIterator[_Served]:
    async for s in _serve(tmp_path, clock):
        yield s


@pytest.fixture
async def object_store(served: _Served) -> LocalObjectStore:
    return served.store


@pytest.fixture
def fetch_signed(served: _Served) -> FetchSigned:
    return served.fetch


@pytest.fixture
def advance_clock(clock: _Clock) -> Callable[[float], None]:
    def advance(seconds: float) -> None:
        clock.offset += seconds

    return advance


class TestLocalObjectStore(ObjectStoreConformance):
    pass


# -- Lite specifics ----------------------------------------------------------------------------


async def test_signed_url_shape(served: _Served) -> None:
    url = await served.store.signed_url("org/1/a b.bin", method="GET", expires_in=60)
    parsed = yarl.URL(url, encoded=True)
    assert parsed.path == "/o/org/1/a b.bin"
    assert url.split("?")[0].endswith("/o/org/1/a%20b.bin")
    assert set(parsed.query) == {"m", "exp", "sig"}
    assert parsed.query["m"] == "GET"
    assert len(parsed.query["sig"]) == 64


async def test_refusals_have_a_json_error_body(served: _Served) -> None:
    url = await served.store.signed_url("x", method="GET", expires_in=60)
    async with served.session.get(yarl.URL(url + "0", encoded=True)) as resp:
        assert resp.status == 403
        body = await resp.json()
        assert body["error"] == "forbidden"
        assert "message" in body
    async with served.session.get(yarl.URL(url, encoded=True)) as resp:
        assert resp.status == 404
        assert (await resp.json())["error"] == "not_found"


async def test_missing_or_repeated_parameters_are_refused(served: _Served) -> None:
    await served.store.put("p", b"data")
    url = await served.store.signed_url("p", method="GET", expires_in=60)
    base, query = url.split("?")
    for bad in (base, f"{base}?{query}&sig=00", f"{base}?{query}&m=GET"):
        assert (await served.fetch(bad, "GET"))[0] == 403


async def test_encoded_traversal_in_the_path_is_refused(served: _Served, tmp_path: Path) -> None:
    (tmp_path / "secret.txt").write_bytes(b"outside")
    url = await served.store.signed_url("a", method="GET", expires_in=60)
    query = url.split("?")[1]
    base = served.store.base_url
    for path in ("/o/%2e%2e/%2e%2e/secret.txt", "/o/..%2f..%2fsecret.txt", "/o/a%00b"):
        status, body = await served.fetch(f"{base}{path}?{query}", "GET")
        assert status in (403, 404, 422)
        assert b"outside" not in body


async def test_upload_over_the_limit_is_413(tmp_path: Path, clock: _Clock) -> None:
    async for served in _serve(tmp_path, clock, max_upload_bytes=10):
        url = await served.store.signed_url("big", method="PUT", expires_in=60)
        status, body = await served.fetch(url, "PUT", b"x" * 11)
        assert status == 413
        assert b"payload_too_large" in body

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: chunked upload
            for _ in range(5):
                yield b"abcd"

        status, _ = await served.fetch(url, "PUT", chunks())  # type: ignore[arg-type]
        assert status == 413
        status, _ = await served.fetch(url, "PUT", b"x" * 10)
        assert status == 200
        assert await served.store.get("big") == b"x" * 10


async def test_head_request_on_get_url(served: _Served) -> None:
    await served.store.put("h", b"12345")
    url = await served.store.signed_url("h", method="GET", expires_in=60)
    async with served.session.head(yarl.URL(url, encoded=True)) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Length"] == "5"


async def test_writes_are_atomic_and_leave_no_temp_files(served: _Served) -> None:
    store = served.store
    payloads = [bytes([i]) * (100_000 + i) for i in range(8)]
    await asyncio.gather(*(store.put("same/key", p) for p in payloads))
    final = await store.get("same/key")
    assert final in payloads
    info = await store.head("same/key")
    assert info.size == len(final)
    assert os.listdir(store.root / "tmp") == []


async def test_files_live_under_root_objects(served: _Served) -> None:
    await served.store.put("org/1/a.parquet", b"pq")
    assert (served.store.root / "objects" / "org" / "1" / "a.parquet").read_bytes() == b"pq"
    assert served.store.path_for("org/1/a.parquet").read_bytes() == b"pq"


async def test_symlink_planted_inside_root_cannot_lead_out(served: _Served, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "f").write_bytes(b"outside")
    os.symlink(outside, served.store.root / "objects" / "link")
    with pytest.raises(UnsafeKey):
        await served.store.get("link/f")
    with pytest.raises(UnsafeKey):
        await served.store.put("link/g", b"x")
    assert not (outside / "g").exists()


async def test_object_and_prefix_of_the_same_name_conflict(served: _Served) -> None:
    await served.store.put("a", b"1")
    with pytest.raises(Conflict):
        await served.store.put("a/b", b"2")
    await served.store.put("c/d", b"3")
    with pytest.raises(Conflict):
        await served.store.put("c", b"4")
    assert [i.key for i in await served.store.list("")] == ["a", "c/d"]


async def test_sha_is_recomputed_when_the_file_changes_behind_the_store(
    served: _Served,
) -> None:
    await served.store.put("s", b"one")
    path = served.store.path_for("s")
    tmp = path.with_name("s.new")
    tmp.write_bytes(b"three")
    os.replace(tmp, path)
    info = await served.store.head("s")
    assert info.size == 5
    import hashlib

    assert info.sha256 == hashlib.sha256(b"three").hexdigest()


def test_short_secret_is_refused(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="16 bytes"):
        LocalObjectStore(tmp_path, "http://x", b"short")
