"""``SecretsManagerStore``: the SecretStore port on AWS Secrets Manager.

Names are the Trace names themselves (``trace/platform/...``, ``trace/org/{org_id}/...``), so
IAM policies can grant per namespace with ``arn:aws:secretsmanager:*:*:secret:trace/org/*``
patterns: the worker-pool role reads ``trace/org/*`` slot secrets; only the Dispatcher's role
reads ``trace/platform/*``. Values are stored as ``SecretBinary``. ``delete`` deletes without a
recovery window (a re-put of the same name must work at once).
"""

from __future__ import annotations

from typing import Any

from trace_aws._boto import AwsCalls, client
from trace_core import errors
from trace_core.ports import MAX_SECRET_BYTES
from trace_core.secret_names import validate_secret_name, validate_secret_prefix


class SecretsManagerStore:
    def __init__(
        self,
        *,
        secretsmanager: Any | None = None,
        endpoint_url: str | None = None,
        region_name: str | None = None,
    ) -> None:
        self._sm = secretsmanager or client(
            "secretsmanager", endpoint_url=endpoint_url, region_name=region_name
        )
        self._calls = AwsCalls(max_workers=8, name="trace-secrets")

    async def put(self, name: str, value: bytes) -> None:
        validate_secret_name(name)
        if len(value) > MAX_SECRET_BYTES:
            raise errors.PayloadTooLarge("secret values are limited to 64 KiB", field="value")
        try:
            await self._calls.run(
                "secretsmanager put",
                self._sm.put_secret_value,
                SecretId=name,
                SecretBinary=bytes(value),
            )
        except errors.NotFound:
            await self._calls.run(
                "secretsmanager create",
                self._sm.create_secret,
                Name=name,
                SecretBinary=bytes(value),
            )

    async def get(self, name: str) -> bytes:
        validate_secret_name(name)
        try:
            resp = await self._calls.run(
                "secretsmanager get", self._sm.get_secret_value, SecretId=name
            )
        except errors.ValidationFailed as exc:  # scheduled for deletion
            raise errors.NotFound("no such secret", field="name") from exc
        if "SecretBinary" in resp:
            return bytes(resp["SecretBinary"])
        return str(resp.get("SecretString", "")).encode()

    async def delete(self, name: str) -> None:
        validate_secret_name(name)
        try:
            await self._calls.run(
                "secretsmanager delete",
                self._sm.delete_secret,
                SecretId=name,
                ForceDeleteWithoutRecovery=True,
            )
        except errors.NotFound:
            pass

    async def list(self, prefix: str) -> list[str]:
        validate_secret_prefix(prefix)

        def names() -> list[str]:
            out: list[str] = []
            for page in self._sm.get_paginator("list_secrets").paginate(
                Filters=[{"Key": "name", "Values": [prefix]}]
            ):
                out += [
                    s["Name"]
                    for s in page.get("SecretList", [])
                    if not s.get("DeletedDate") and s["Name"].startswith(prefix)
                ]
            return out

        return sorted(await self._calls.run("secretsmanager list", names))

    async def close(self) -> None:
        self._calls.close()


__all__ = ["SecretsManagerStore"]
