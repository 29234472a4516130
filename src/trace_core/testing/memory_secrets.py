"""``MemorySecretStore``: the SecretStore port in a dict (tests, in-process use)."""

from __future__ import annotations

from trace_core import errors
from trace_core.ports import MAX_SECRET_BYTES
from trace_core.secret_names import validate_secret_name, validate_secret_prefix


class MemorySecretStore:
    def __init__(self) -> None:
        self._values: dict[str, bytes] = {}

    async def put(self, name: str, value: bytes) -> None:
        validate_secret_name(name)
        if len(value) > MAX_SECRET_BYTES:
            raise errors.PayloadTooLarge("secret values are limited to 64 KiB", field="value")
        self._values[name] = bytes(value)

    async def get(self, name: str) -> bytes:
        validate_secret_name(name)
        try:
            return self._values[name]
        except KeyError:
            raise errors.NotFound("no such secret", field="name") from None

    async def delete(self, name: str) -> None:
        self._values.pop(validate_secret_name(name), None)

    async def list(self, prefix: str) -> list[str]:
        validate_secret_prefix(prefix)
        return sorted(n for n in self._values if n.startswith(prefix))


__all__ = ["MemorySecretStore"]
