"""The ``SecretStore`` conformance suite: every adapter runs it unchanged.

Subclass it and provide one fixture, ``secret_store``: a fresh store with no secrets under
``trace/platform/conf/`` and ``trace/org/{org}/`` for the ``org`` fixture's value (a unique org id
per test, provided by the suite).
"""

from __future__ import annotations

import uuid

import pytest

from trace_core.errors import NotFound, PayloadTooLarge, ValidationFailed
from trace_core.ports import MAX_SECRET_BYTES, SecretStore
from trace_core.secret_names import org_prefix, org_secret, platform_secret

BAD_NAMES = [
    "",
    "rpc_key",
    "trace/",
    "trace/platform/",
    "trace/org/o1",
    "other/platform/x",
    "trace/platform/../org/o1/x",
    "trace/platform/a//b",
    "trace/platform/a b",
    "trace/platform/a\x00",
    "/trace/platform/x",
    "trace/platform/" + "x" * 600,
]


class SecretStoreConformance:
    """Tests every ``SecretStore`` adapter must pass."""

    @pytest.fixture
    def org(self) -> str:
        return f"o{uuid.uuid4().hex[:10]}"

    async def test_is_a_secret_store(self, secret_store: SecretStore) -> None:
        assert isinstance(secret_store, SecretStore)

    async def test_put_get_overwrite_delete(self, secret_store: SecretStore, org: str) -> None:
        name = org_secret(org, "rpc/alchemy_key")
        await secret_store.put(name, b"first")
        assert await secret_store.get(name) == b"first"
        await secret_store.put(name, b"second\x00\xff")
        assert await secret_store.get(name) == b"second\x00\xff"
        await secret_store.delete(name)
        with pytest.raises(NotFound):
            await secret_store.get(name)
        await secret_store.delete(name)  # idempotent

    async def test_missing_secret_is_not_found(self, secret_store: SecretStore, org: str) -> None:
        with pytest.raises(NotFound):
            await secret_store.get(org_secret(org, "never"))

    async def test_namespaces_are_separate(self, secret_store: SecretStore, org: str) -> None:
        other = org + "x"
        await secret_store.put(platform_secret(f"conf/{org}"), b"platform")
        await secret_store.put(org_secret(org, "a"), b"1")
        await secret_store.put(org_secret(org, "b/c"), b"2")
        await secret_store.put(org_secret(other, "a"), b"other org")
        assert await secret_store.list(org_prefix(org)) == [
            org_secret(org, "a"),
            org_secret(org, "b/c"),
        ]
        assert await secret_store.list(org_prefix(other)) == [org_secret(other, "a")]
        assert platform_secret(f"conf/{org}") in await secret_store.list("trace/platform/conf/")
        for name in (
            org_secret(org, "a"),
            org_secret(org, "b/c"),
            org_secret(other, "a"),
            platform_secret(f"conf/{org}"),
        ):
            await secret_store.delete(name)

    @pytest.mark.parametrize("name", BAD_NAMES)
    async def test_bad_names_are_refused(self, secret_store: SecretStore, name: str) -> None:
        for call in (
            lambda: secret_store.put(name, b"x"),
            lambda: secret_store.get(name),
            lambda: secret_store.delete(name),
        ):
            with pytest.raises(ValidationFailed):
                await call()

    @pytest.mark.parametrize("prefix", ["", "trace/", "trace/org/", "trace/org/o1", "x/"])
    async def test_bad_prefixes_are_refused(self, secret_store: SecretStore, prefix: str) -> None:
        with pytest.raises(ValidationFailed):
            await secret_store.list(prefix)

    async def test_value_size_limit(self, secret_store: SecretStore, org: str) -> None:
        name = org_secret(org, "big")
        with pytest.raises(PayloadTooLarge):
            await secret_store.put(name, b"x" * (MAX_SECRET_BYTES + 1))
        await secret_store.put(name, b"x" * MAX_SECRET_BYTES)
        assert len(await secret_store.get(name)) == MAX_SECRET_BYTES
        await secret_store.delete(name)


__all__ = ["BAD_NAMES", "SecretStoreConformance"]
