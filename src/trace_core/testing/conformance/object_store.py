"""The ``ObjectStore`` conformance suite: every adapter runs it unchanged.

Use it by subclassing in an adapter's contract test module and providing three fixtures::

    class TestMyStore(ObjectStoreConformance):
        @pytest.fixture
        async def object_store(self): ...          # a fresh, empty store
        @pytest.fixture
        def fetch_signed(self): ...                # async (url, method, data=None) -> (status, body)
        @pytest.fixture
        def advance_clock(self): ...               # (seconds) -> None: moves the clock the store
                                                   # (and its URL server) uses for expiry

``fetch_signed`` must perform the request the way a real client would (a real HTTP request for
HTTP adapters). Refused signed URLs must answer 403, missing objects 404, success 2xx.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pytest

from trace_core.errors import NotFound, UnsafeKey, ValidationFailed
from trace_core.ports import ObjectInfo, ObjectStore

FetchSigned = Callable[..., Awaitable[tuple[int, bytes]]]
AdvanceClock = Callable[[float], None]

#: Keys every adapter must refuse, on every method.
UNSAFE_KEYS = [
    "",
    "/etc/passwd",
    "..",
    "../escape",
    "a/../../escape",
    "./a",
    "a/./b",
    "a//b",
    "a/",
    "a\\..\\b",
    "a\x00b",
    "a\nb",
    "%2e%2e/escape",
    "a%2fb",
    "a%5cb",
    "a%00b",
    "x" * 1025,
]
#: Prefixes every adapter must refuse in ``list``.
UNSAFE_PREFIXES = ["/", "/etc", "../", "a/../", "a//", "%2e%2e/", "a\\", "a\x00"]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _replace_param(url: str, match: Callable[[str], bool], new: Callable[[str], str]) -> str:
    """``url`` with the value of every query parameter whose name matches replaced."""
    parts = urlsplit(url)
    pairs = [(k, new(v) if match(k) else v) for k, v in parse_qsl(parts.query, True)]
    return urlunsplit(parts._replace(query=urlencode(pairs)))


def _flip_last(value: str) -> str:
    if not value:
        return "0"
    return value[:-1] + ("0" if value[-1] != "0" else "1")


class ObjectStoreConformance:
    """Tests every ``ObjectStore`` adapter must pass."""

    # -- basics ----------------------------------------------------------------------------------

    async def test_is_an_object_store(self, object_store: ObjectStore) -> None:
        assert isinstance(object_store, ObjectStore)

    async def test_put_then_get_and_head(self, object_store: ObjectStore) -> None:
        data = b"\x00partition bytes\xff" * 100
        info = await object_store.put("org/1/dataset/d/v1/part-0.parquet", data)
        assert info == ObjectInfo("org/1/dataset/d/v1/part-0.parquet", len(data), _sha(data))
        assert await object_store.get("org/1/dataset/d/v1/part-0.parquet") == data
        assert await object_store.head("org/1/dataset/d/v1/part-0.parquet") == info

    async def test_empty_object(self, object_store: ObjectStore) -> None:
        info = await object_store.put("empty", b"")
        assert info == ObjectInfo("empty", 0, _sha(b""))
        assert await object_store.get("empty") == b""

    async def test_overwrite_replaces_content_and_metadata(self, object_store: ObjectStore) -> None:
        await object_store.put("k/v", b"first version")
        info = await object_store.put("k/v", b"2nd")
        assert info == ObjectInfo("k/v", 3, _sha(b"2nd"))
        assert await object_store.get("k/v") == b"2nd"
        assert await object_store.head("k/v") == info
        assert await object_store.list("k/") == [info]

    async def test_missing_object_is_not_found(self, object_store: ObjectStore) -> None:
        with pytest.raises(NotFound):
            await object_store.get("nope/missing")
        with pytest.raises(NotFound):
            await object_store.head("nope/missing")

    async def test_delete_is_idempotent(self, object_store: ObjectStore) -> None:
        await object_store.put("d/x", b"1")
        await object_store.delete("d/x")
        with pytest.raises(NotFound):
            await object_store.get("d/x")
        await object_store.delete("d/x")
        await object_store.delete("never/existed")
        assert await object_store.list("d/") == []

    async def test_list_by_prefix_sorted(self, object_store: ObjectStore) -> None:
        keys = ["org/2/b", "org/1/z", "org/1/a/deep/x", "org/10/a", "org/1/m", "other"]
        for key in keys:
            await object_store.put(key, key.encode())
        listed = await object_store.list("org/1/")
        assert [i.key for i in listed] == ["org/1/a/deep/x", "org/1/m", "org/1/z"]
        assert all(i.size == len(i.key) and i.sha256 == _sha(i.key.encode()) for i in listed)
        # Prefixes match as plain strings (like S3), not only at segment boundaries.
        assert [i.key for i in await object_store.list("org/1")] == [
            "org/1/a/deep/x",
            "org/1/m",
            "org/1/z",
            "org/10/a",
        ]
        assert [i.key for i in await object_store.list("")] == sorted(keys)
        assert await object_store.list("nothing/") == []

    async def test_keys_with_unusual_but_safe_characters(self, object_store: ObjectStore) -> None:
        for key in ["a b/c d.txt", "ünï/キー", "q?x=1#frag", "...", "x&y=z"]:
            await object_store.put(key, key.encode())
            assert await object_store.get(key) == key.encode()
        assert len(await object_store.list("")) == 5

    # -- unsafe keys -----------------------------------------------------------------------------

    @pytest.mark.parametrize("key", UNSAFE_KEYS)
    async def test_unsafe_key_refused_on_every_method(
        self, object_store: ObjectStore, key: str
    ) -> None:
        calls: list[Callable[[], Awaitable[Any]]] = [
            lambda: object_store.put(key, b"x"),
            lambda: object_store.get(key),
            lambda: object_store.head(key),
            lambda: object_store.delete(key),
            lambda: object_store.signed_url(key, method="GET", expires_in=60),
            lambda: object_store.signed_url(key, method="PUT", expires_in=60),
        ]
        for call in calls:
            with pytest.raises(UnsafeKey) as info:
                await call()
            assert info.value.field == "key"
        assert await object_store.list("") == []

    @pytest.mark.parametrize("prefix", UNSAFE_PREFIXES)
    async def test_unsafe_prefix_refused_on_list(
        self, object_store: ObjectStore, prefix: str
    ) -> None:
        with pytest.raises(UnsafeKey):
            await object_store.list(prefix)

    # -- signed URLs -----------------------------------------------------------------------------

    async def test_signed_url_arguments_are_validated(self, object_store: ObjectStore) -> None:
        for method, expires_in in [("DELETE", 60), ("get", 60), ("POST", 60), ("GET", 0)]:
            with pytest.raises(ValidationFailed):
                await object_store.signed_url("a", method=method, expires_in=expires_in)
        with pytest.raises(ValidationFailed):
            await object_store.signed_url("a", method="PUT", expires_in=-1)

    async def test_signed_get_roundtrip(
        self, object_store: ObjectStore, fetch_signed: FetchSigned
    ) -> None:
        data = b"signed get content " * 50
        await object_store.put("org/1/exports/q.csv", data)
        url = await object_store.signed_url("org/1/exports/q.csv", method="GET", expires_in=60)
        status, body = await fetch_signed(url, "GET")
        assert status == 200
        assert body == data

    async def test_signed_put_roundtrip(
        self, object_store: ObjectStore, fetch_signed: FetchSigned
    ) -> None:
        url = await object_store.signed_url("org/1/buffer/b 1.bin", method="PUT", expires_in=60)
        status, _ = await fetch_signed(url, "PUT", b"uploaded")
        assert 200 <= status < 300
        assert await object_store.get("org/1/buffer/b 1.bin") == b"uploaded"
        info = await object_store.head("org/1/buffer/b 1.bin")
        assert info.sha256 == _sha(b"uploaded")
        # The same URL may overwrite while it is valid.
        status, _ = await fetch_signed(url, "PUT", b"again")
        assert 200 <= status < 300
        assert await object_store.get("org/1/buffer/b 1.bin") == b"again"

    async def test_signed_get_of_missing_object_is_404(
        self, object_store: ObjectStore, fetch_signed: FetchSigned
    ) -> None:
        url = await object_store.signed_url("gone/x", method="GET", expires_in=60)
        status, _ = await fetch_signed(url, "GET")
        assert status == 404

    async def test_expired_url_is_refused(
        self,
        object_store: ObjectStore,
        fetch_signed: FetchSigned,
        advance_clock: AdvanceClock,
    ) -> None:
        await object_store.put("e/x", b"data")
        get_url = await object_store.signed_url("e/x", method="GET", expires_in=30)
        put_url = await object_store.signed_url("e/x", method="PUT", expires_in=30)
        advance_clock(31)
        assert (await fetch_signed(get_url, "GET"))[0] == 403
        assert (await fetch_signed(put_url, "PUT", b"late"))[0] == 403
        assert await object_store.get("e/x") == b"data"

    async def test_put_url_cannot_be_used_for_get_and_vice_versa(
        self, object_store: ObjectStore, fetch_signed: FetchSigned
    ) -> None:
        await object_store.put("m/x", b"secret")
        put_url = await object_store.signed_url("m/x", method="PUT", expires_in=60)
        status, body = await fetch_signed(put_url, "GET")
        assert status == 403
        assert b"secret" not in body
        get_url = await object_store.signed_url("m/x", method="GET", expires_in=60)
        assert (await fetch_signed(get_url, "PUT", b"overwrite"))[0] == 403
        assert await object_store.get("m/x") == b"secret"

    async def test_url_with_changed_key_is_refused(
        self, object_store: ObjectStore, fetch_signed: FetchSigned
    ) -> None:
        await object_store.put("t/aaa.bin", b"granted")
        await object_store.put("t/bbb.bin", b"not granted")
        url = await object_store.signed_url("t/aaa.bin", method="GET", expires_in=60)
        assert url.count("aaa.bin") == 1
        status, body = await fetch_signed(url.replace("aaa.bin", "bbb.bin"), "GET")
        assert status == 403
        assert b"not granted" not in body
        put_url = await object_store.signed_url("t/aaa.bin", method="PUT", expires_in=60)
        status, _ = await fetch_signed(put_url.replace("aaa.bin", "bbb.bin"), "PUT", b"x")
        assert status == 403
        assert await object_store.get("t/bbb.bin") == b"not granted"

    async def test_url_with_changed_signature_is_refused(
        self, object_store: ObjectStore, fetch_signed: FetchSigned
    ) -> None:
        await object_store.put("s/x", b"data")
        url = await object_store.signed_url("s/x", method="GET", expires_in=60)
        tampered = _replace_param(url, lambda k: "sig" in k.lower(), _flip_last)
        assert tampered != url
        assert (await fetch_signed(tampered, "GET"))[0] == 403
        stripped = _replace_param(url, lambda k: "sig" in k.lower(), lambda v: "")
        assert (await fetch_signed(stripped, "GET"))[0] == 403

    async def test_url_with_changed_method_or_expiry_is_refused(
        self, object_store: ObjectStore, fetch_signed: FetchSigned
    ) -> None:
        await object_store.put("c/x", b"data")
        url = await object_store.signed_url("c/x", method="GET", expires_in=60)
        query = dict(parse_qsl(urlsplit(url).query, True))
        if any(v == "GET" for v in query.values()):
            as_put = _replace_param(url, lambda k: query[k] == "GET", lambda v: "PUT")
            assert (await fetch_signed(as_put, "PUT", b"forged"))[0] == 403
            assert await object_store.get("c/x") == b"data"
        longer = _replace_param(
            url,
            lambda k: "exp" in k.lower(),
            lambda v: str(int(v) + 3600) if v.isdigit() else v + "0",
        )
        if longer != url:
            assert (await fetch_signed(longer, "GET"))[0] == 403


__all__ = [
    "UNSAFE_KEYS",
    "UNSAFE_PREFIXES",
    "AdvanceClock",
    "FetchSigned",
    "ObjectStoreConformance",
]
