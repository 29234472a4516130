"""``StsCredentialMinter``: the Dispatcher's scoped S3 credentials for one attempt (STS).

There is no separate credential broker: the Dispatcher's ``/v1/task/credentials``
route authorizes the capability token, checks the fence, and asks this minter for credentials.
The grant is built and checked by the pure ``trace_aws.session_policy`` first, so a prefix
outside the attempt's grant is refused before any AWS call; then one ``AssumeRole`` with the
session policy and a session length tied to the attempt.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from trace_aws._boto import AwsCalls, client
from trace_aws.session_policy import CredentialGrant, grant_for_attempt, session_policy
from trace_core import wire


class StsCredentialMinter:
    """Mints attempt-scoped credentials by assuming ``role_arn`` with a session policy."""

    def __init__(
        self,
        role_arn: str,
        bucket: str,
        *,
        root: str = "",
        sts: Any | None = None,
        endpoint_url: str | None = None,
        region_name: str | None = None,
    ) -> None:
        self.role_arn = role_arn
        self.bucket = bucket
        self.root = root
        self._sts = sts or client("sts", endpoint_url=endpoint_url, region_name=region_name)
        self.region = str(self._sts.meta.region_name)
        self._calls = AwsCalls(max_workers=8, name="trace-sts")

    def grant(
        self,
        *,
        org_id: str,
        task_id: str,
        attempt: int,
        timeout_s: int,
        payload: Mapping[str, Any],
        requested: Sequence[str] | None,
    ) -> CredentialGrant:
        """The attempt's grant: reads from the payload's ``input_prefixes``, writes to its
        staging prefix. Raises ``UnsafeKey``, ``Forbidden`` (no AWS call is made)."""
        inputs = payload.get("input_prefixes") or []
        if not isinstance(inputs, list):
            inputs = []
        return grant_for_attempt(
            bucket=self.bucket,
            org_id=org_id,
            task_id=task_id,
            attempt=attempt,
            timeout_s=timeout_s,
            read_prefixes=inputs,
            requested=requested,
            root=self.root,
        )

    async def mint(
        self,
        *,
        org_id: str,
        task_id: str,
        attempt: int,
        timeout_s: int,
        payload: Mapping[str, Any],
        requested: Sequence[str] | None = None,
    ) -> wire.CredentialsResponse:
        """Credentials for exactly the attempt's grant. Raises ``UnsafeKey``, ``Forbidden``
        (before any AWS call), ``Unavailable``, ``Forbidden`` (STS refused)."""
        grant = self.grant(
            org_id=org_id,
            task_id=task_id,
            attempt=attempt,
            timeout_s=timeout_s,
            payload=payload,
            requested=requested,
        )
        resp = await self._calls.run(
            "sts assume role",
            self._sts.assume_role,
            RoleArn=self.role_arn,
            RoleSessionName=f"trace-{task_id[:40]}-{attempt}"[:64],
            Policy=json.dumps(session_policy(grant), separators=(",", ":")),
            DurationSeconds=grant.duration_s,
            Tags=[
                {"Key": "trace:org_id", "Value": org_id},
                {"Key": "trace:task_id", "Value": task_id},
            ],
        )
        creds = resp["Credentials"]
        return wire.CredentialsResponse(
            access_key_id=creds["AccessKeyId"],
            secret_access_key=creds["SecretAccessKey"],
            session_token=creds["SessionToken"],
            expiration=creds["Expiration"].isoformat(),
            region=self.region,
            bucket=self.bucket,
            read_prefixes=[self.root + p for p in grant.read_prefixes],
            write_prefix=self.root + grant.write_prefix,
        )

    async def close(self) -> None:
        self._calls.close()


__all__ = ["StsCredentialMinter"]
