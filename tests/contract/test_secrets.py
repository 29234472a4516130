"""The SecretStore conformance suite on every adapter: memory, Lite files, Secrets Manager
(moto server over HTTP); plus the Lite env override and file modes."""

from __future__ import annotations

import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from trace_aws.secrets import SecretsManagerStore
from trace_core.secret_names import namespace_of, org_secret, platform_secret
from trace_core.testing.conformance.secrets import SecretStoreConformance
from trace_core.testing.memory_secrets import MemorySecretStore
from trace_lite.secrets import FileSecretStore, env_var_for


class TestMemorySecretStore(SecretStoreConformance):
    @pytest.fixture
    def secret_store(self) -> MemorySecretStore:
        return MemorySecretStore()


class TestFileSecretStore(SecretStoreConformance):
    @pytest.fixture
    def secret_store(self, tmp_path: Path) -> FileSecretStore:
        return FileSecretStore(tmp_path / "secrets", env={})


class TestSecretsManagerStore(SecretStoreConformance):
    @pytest.fixture
    async def secret_store(self, moto_server: Any) -> AsyncIterator[SecretsManagerStore]:
        store = SecretsManagerStore(endpoint_url=moto_server.url)
        yield store
        await store.close()


async def test_file_store_modes_and_env_override(tmp_path: Path) -> None:
    name = org_secret("o1", "rpc_key")
    store = FileSecretStore(tmp_path / "s", env={env_var_for(name): "from-env"})
    assert env_var_for(name) == "TRACE_SECRET_TRACE_ORG_O1_RPC_KEY"
    assert await store.get(name) == b"from-env"
    await store.put(name, b"from-file")
    assert await store.get(name) == b"from-file"
    assert stat.S_IMODE((tmp_path / "s").stat().st_mode) == 0o700
    [f] = list((tmp_path / "s").iterdir())
    assert stat.S_IMODE(f.stat().st_mode) == 0o600


def test_namespaces() -> None:
    assert namespace_of(platform_secret("platform_token")) == "platform"
    assert namespace_of(org_secret("o1", "k")) == "org"
