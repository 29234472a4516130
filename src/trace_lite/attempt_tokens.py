"""Capability tokens of attempts: minted when an attempt starts or heartbeats, checked on every
attempt-scoped call.

``AttemptTokens`` is the Dispatcher's token half. It mints a token for ``(task, attempt)`` with
the kernel's claims (``trace_core.token.issue_claims``) and the process's ``TokenIssuer``, and
hands the verifier what it just signed, digest and kid included (so verifying it skips the
signature, and remembering it parses nothing). Checking a token is two steps:
``TokenVerifier.verify`` (signature, key set, time) and ``check_claims`` against the task row --
nothing a token says is taken on trust, even though only a key holder can sign one.

The clock is read here (``clock_epoch``, default ``time.time``): the kernel is handed ``now``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence

from trace_core import errors
from trace_core.token import (
    CapabilityClaims,
    TokenPolicy,
    check_binding,
    issue_claims,
    subject_for,
)
from trace_lite.capabilities import TokenIssuer, TokenVerifier
from trace_lite.task_orgs import TaskOrgs


class AttemptTokens:
    """Mints and checks the capability tokens of attempts (see the module docstring)."""

    def __init__(
        self,
        *,
        issuer: TokenIssuer,
        verifier: TokenVerifier,
        orgs: TaskOrgs,
        policy: TokenPolicy,
        clock_epoch: Callable[[], float] | None = None,
    ) -> None:
        self.issuer = issuer
        self.verifier = verifier
        self.orgs = orgs
        self.policy = policy
        self._clock_epoch = clock_epoch or time.time

    async def mint(
        self,
        *,
        org_id: str,
        task_id: str,
        attempt: int,
        timeout_s: int,
        read_datasets: Sequence[str] = (),
    ) -> str:
        """A signed token for the attempt, granting ``read_datasets``; remembered as verified.
        Raises ``SignerError``."""
        claims = issue_claims(
            self.policy,
            org_id=org_id,
            task_id=task_id,
            attempt=attempt,
            attempt_timeout_s=timeout_s,
            now_epoch=int(self._clock_epoch()),
            jti=uuid.uuid4().hex,
            grants={"datasets": {"read": list(read_datasets)}} if read_datasets else None,
        )
        signed = await self.issuer.sign(claims)
        self.verifier.remember_signed(signed, claims)
        self.orgs.remember(task_id, org_id)
        return signed.token

    async def authorize(self, token: str | None, task_id: str, attempt: int) -> CapabilityClaims:
        """Verify a capability token, bind it to ``(task_id, attempt)`` and check its claims
        against the task row (``check_claims``).

        Raises ``Unauthenticated`` (missing, malformed, bad signature, unknown key, expired,
        claims that do not match the task), ``Forbidden`` (another task or attempt).
        """
        if not token:
            raise errors.Unauthenticated("missing X-Trace-Task-Capability")
        now = int(self._clock_epoch())
        claims = await self.verifier.verify(token, now_epoch=now, monotonic=time.monotonic())
        check_binding(claims, task_id, attempt)
        await self.check_claims(claims)
        return claims

    async def check_claims(self, claims: CapabilityClaims) -> None:
        """Check a verified token's claims against its task row.

        ``sub`` must name the token's own task and attempt, and ``org_id`` must be the task's
        org (cached per task: a task's org never changes). Returns None. Raises
        ``Unauthenticated`` for any mismatch, a task id or org id that is not a canonical UUID,
        or a task that does not exist; ``Unavailable``.
        """
        if claims.sub != subject_for(claims.task_id, claims.attempt):
            raise errors.Unauthenticated("capability token: sub does not name its task and attempt")
        if not (_is_canonical_uuid(claims.task_id) and _is_canonical_uuid(claims.org_id)):
            raise errors.Unauthenticated("capability token: task_id and org_id must be UUIDs")
        if await self.orgs.of_task(claims.task_id) != claims.org_id:
            raise errors.Unauthenticated("capability token: org_id is not the task's org")


def _is_canonical_uuid(value: str) -> bool:
    try:
        return str(uuid.UUID(value)) == value
    except ValueError:
        return False


__all__ = ["AttemptTokens"]
