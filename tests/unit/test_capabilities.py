"""``TokenIssuer.sign`` hands over what the verifier remembers a token by (digest, kid), so a
token minted here is remembered without being parsed back, and verifies by lookup."""

from __future__ import annotations

import pytest

import trace_lite.capabilities
from trace_core.errors import Unauthenticated
from trace_core.jws import parse
from trace_core.testing import MemorySigner
from trace_core.token import CapabilityClaims, TokenPolicy, issue_claims
from trace_lite.attempt_tokens import AttemptTokens
from trace_lite.capabilities import TokenIssuer, TokenVerifier
from trace_lite.task_orgs import TaskOrgs

POLICY = TokenPolicy()
NOW = 1_700_000_000


def _claims(jti: str = "jti-1") -> CapabilityClaims:
    return issue_claims(
        POLICY,
        org_id="00000000-0000-4000-8000-000000000001",
        task_id="00000000-0000-4000-8000-000000000002",
        attempt=1,
        attempt_timeout_s=60,
        now_epoch=NOW,
        jti=jti,
    )


async def test_a_signed_token_carries_the_digest_and_kid_its_parse_gives() -> None:
    signer = MemorySigner()
    issuer = TokenIssuer(signer)
    first = await issuer.sign(_claims())
    signer.rotate(force=True)  # the issuer's key hint is stale: it re-signs with the new key
    second = await issuer.sign(_claims("jti-2"))
    assert first.kid != second.kid == signer.current_kid
    for signed in (first, second):
        parsed = parse(signed.token)
        assert (signed.digest, signed.kid) == (parsed.digest, parsed.kid)


async def test_a_minted_token_is_remembered_and_verified_without_parsing_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    signer = MemorySigner()
    issuer, verifier = TokenIssuer(signer), TokenVerifier(signer, POLICY)
    signed = await issuer.sign(_claims())

    def no_parse(token: str, **kw: object) -> object:
        raise AssertionError("a token this process signed was parsed")

    monkeypatch.setattr(trace_lite.capabilities, "parse", no_parse)
    verifier.remember_signed(signed, _claims())
    assert await verifier.verify(signed.token, now_epoch=NOW, monotonic=0.0) == _claims()
    with pytest.raises(Unauthenticated):  # expiry still applies to a remembered token
        await verifier.verify(signed.token, now_epoch=NOW + 3600, monotonic=0.0)


async def test_the_dispatcher_mints_tokens_it_authorizes_without_parsing_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    signer = MemorySigner()
    tokens = AttemptTokens(
        issuer=TokenIssuer(signer),
        verifier=TokenVerifier(signer, POLICY),
        orgs=TaskOrgs(None),  # type: ignore[arg-type]  # the minted task's org is cached
        policy=POLICY,
        clock_epoch=lambda: NOW,
    )
    claims = _claims()

    def no_parse(token: str, **kw: object) -> object:
        raise AssertionError("a token this process signed was parsed")

    monkeypatch.setattr(trace_lite.capabilities, "parse", no_parse)
    token = await tokens.mint(org_id=claims.org_id, task_id=claims.task_id, attempt=1, timeout_s=60)
    authorized = await tokens.authorize(token, claims.task_id, 1)
    assert (authorized.task_id, authorized.org_id, authorized.attempt) == (
        claims.task_id,
        claims.org_id,
        1,
    )
