"""``FileSecretStore``: the SecretStore port on files (Lite), with read-only env overrides.

Each secret is one file under ``root`` (directory 0700, files 0600, written atomically) whose
file name is the hex of the secret name, so no name can form a path. ``get`` falls back to the
environment variable ``TRACE_SECRET_<NAME>`` (the name upper-cased, every other character
``_``), so a deployment can inject a secret without writing it to disk.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Mapping
from pathlib import Path

from trace_core import errors
from trace_core.ports import MAX_SECRET_BYTES
from trace_core.secret_names import validate_secret_name, validate_secret_prefix


def env_var_for(name: str) -> str:
    """The environment variable that overrides secret ``name``."""
    return "TRACE_SECRET_" + re.sub(r"[^A-Za-z0-9]", "_", name).upper()


class FileSecretStore:
    def __init__(self, root: Path, env: Mapping[str, str] | None = None) -> None:
        self.root = Path(root)
        self._env = os.environ if env is None else env

    def _path(self, name: str) -> Path:
        return self.root / (validate_secret_name(name).encode().hex() + ".secret")

    def _put(self, name: str, value: bytes) -> None:
        path = self._path(name)
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o700)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(value)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    async def put(self, name: str, value: bytes) -> None:
        self._path(name)
        if len(value) > MAX_SECRET_BYTES:
            raise errors.PayloadTooLarge("secret values are limited to 64 KiB", field="value")
        try:
            await asyncio.to_thread(self._put, name, bytes(value))
        except OSError as exc:
            raise errors.Unavailable(f"secret store: {exc.strerror}") from exc

    async def get(self, name: str) -> bytes:
        path = self._path(name)
        try:
            return await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError:
            value = self._env.get(env_var_for(name))
            if value is None:
                raise errors.NotFound("no such secret", field="name") from None
            return value.encode()
        except OSError as exc:
            raise errors.Unavailable(f"secret store: {exc.strerror}") from exc

    async def delete(self, name: str) -> None:
        path = self._path(name)
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise errors.Unavailable(f"secret store: {exc.strerror}") from exc

    async def list(self, prefix: str) -> list[str]:
        validate_secret_prefix(prefix)
        if not self.root.is_dir():
            return []
        names = []
        for p in self.root.glob("*.secret"):
            try:
                name = bytes.fromhex(p.name[: -len(".secret")]).decode()
            except ValueError:
                continue
            if name.startswith(prefix):
                names.append(name)
        return sorted(names)


__all__ = ["FileSecretStore", "env_var_for"]
