"""The ``Signer`` conformance suite: every adapter runs it unchanged.

Use it by subclassing in an adapter's contract test module and providing two fixtures::

    class TestMySigner(SignerConformance):
        @pytest.fixture
        async def signer(self): ...          # a signer with a current and a published next key
        @pytest.fixture
        def rotate_signer(self): ...         # async (signer) -> None: rotate next → current,
                                             # bypassing the publish-age wait if it must
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest

from trace_core.jws import (
    SUPPORTED_ALGORITHMS,
    assemble,
    header_for,
    load_public_key,
    signing_input,
    unverified_kid,
    verify_jws,
    verify_token,
)
from trace_core.ports import PublicKey, Signer
from trace_core.token import CapabilityClaims, TokenPolicy, issue_claims

RotateSigner = Callable[[Signer], Awaitable[None]]

_INPUT = b"eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJ0YXNrIn0"


def _by_kid(keys: list[PublicKey]) -> dict[str, PublicKey]:
    return {k.kid: k for k in keys}


async def encode_token(claims: CapabilityClaims, signer: Signer) -> str:
    """Sign ``claims`` with ``signer`` using only the kernel's pure JWS functions."""
    kid, alg, _ = await signer.sign(_INPUT)  # which key signs now
    signed = signing_input(header_for(kid, alg, claims.typ), claims.to_payload())
    signed_kid, _, signature = await signer.sign(signed)
    assert signed_kid == kid, "the signer changed keys between two calls"
    return assemble(signed, signature)


class SignerConformance:
    """Tests every ``Signer`` adapter must pass."""

    async def test_is_a_signer(self, signer: Signer) -> None:
        assert isinstance(signer, Signer)

    async def test_public_keys_list_current_and_next(self, signer: Signer) -> None:
        keys = await signer.public_keys()
        kids = [k.kid for k in keys]
        assert len(kids) == len(set(kids)) >= 2
        kid, alg, _ = await signer.sign(_INPUT)
        assert kid in kids
        for key in keys:
            assert key.algorithm in SUPPORTED_ALGORITHMS
            load_public_key(key.public_pem, key.algorithm)  # loadable and fits its algorithm
        assert _by_kid(keys)[kid].algorithm == alg

    async def test_sign_verify_roundtrip(self, signer: Signer) -> None:
        kid, alg, sig = await signer.sign(_INPUT)
        assert alg in SUPPORTED_ALGORITHMS
        assert await signer.verify(kid, _INPUT, sig)
        # The signature is in JWS form and verifies independently with the published key.
        public = _by_kid(await signer.public_keys())[kid]
        assert verify_jws(load_public_key(public.public_pem, public.algorithm), _INPUT, sig)
        if alg == "ES256":
            assert len(sig) == 64

    async def test_signing_twice_uses_the_same_key(self, signer: Signer) -> None:
        first = await signer.sign(b"one")
        second = await signer.sign(b"two")
        assert first[:2] == second[:2]

    async def test_verify_false_for_unknown_kid(self, signer: Signer) -> None:
        _, _, sig = await signer.sign(_INPUT)
        for kid in ("", "unknown-kid", "0" * 16, "../current"):
            assert await signer.verify(kid, _INPUT, sig) is False

    async def test_verify_false_for_bad_signature(self, signer: Signer) -> None:
        kid, _, sig = await signer.sign(_INPUT)
        flipped = bytes([sig[0] ^ 1]) + sig[1:]
        for bad in (flipped, sig[:-1], b"", b"\x00" * 64, sig + b"\x00"):
            assert await signer.verify(kid, _INPUT, bad) is False
        assert await signer.verify(kid, _INPUT + b"x", sig) is False

    async def test_next_key_does_not_verify_current_signatures(self, signer: Signer) -> None:
        kid, _, sig = await signer.sign(_INPUT)
        for other in (k.kid for k in await signer.public_keys() if k.kid != kid):
            assert await signer.verify(other, _INPUT, sig) is False

    async def test_token_roundtrip_through_jws(self, signer: Signer) -> None:
        policy = TokenPolicy()
        claims = issue_claims(
            policy,
            org_id="o",
            task_id="t",
            attempt=1,
            attempt_timeout_s=60,
            now_epoch=1_800_000_000,
            jti="j",
        )
        token = await encode_token(claims, signer)
        keys = _by_kid(await signer.public_keys())
        assert verify_token(token, keys, policy, 1_800_000_000) == claims

    async def test_rotation_promotes_the_published_next_key(
        self, signer: Signer, rotate_signer: RotateSigner
    ) -> None:
        old_kid, _, old_sig = await signer.sign(_INPUT)
        before = _by_kid(await signer.public_keys())
        await rotate_signer(signer)
        new_kid, _, new_sig = await signer.sign(_INPUT)
        after = _by_kid(await signer.public_keys())
        assert new_kid != old_kid
        # The new signing key was published before it signed anything.
        assert new_kid in before
        # The old key is retired but still verifies (inside its grace), and so do its tokens.
        assert old_kid in after
        assert await signer.verify(old_kid, _INPUT, old_sig)
        assert await signer.verify(new_kid, _INPUT, new_sig)
        # A fresh next key is published again.
        assert len(set(after) - set(before)) >= 1

    async def test_tokens_signed_before_rotation_still_verify(
        self, signer: Signer, rotate_signer: RotateSigner
    ) -> None:
        policy = TokenPolicy()
        now = 1_800_000_000
        claims = issue_claims(
            policy,
            org_id="o",
            task_id="t",
            attempt=1,
            attempt_timeout_s=900,
            now_epoch=now,
            jti="j",
        )
        token = await encode_token(claims, signer)
        await rotate_signer(signer)
        keys = _by_kid(await signer.public_keys())
        assert unverified_kid(token) in keys
        assert verify_token(token, keys, policy, now + 60) == claims
        fresh = await encode_token(claims, signer)
        assert unverified_kid(fresh) != unverified_kid(token)
        assert verify_token(fresh, keys, policy, now + 60) == claims

    @pytest.mark.parametrize("garbage", [b"", b"\xff" * 200])
    async def test_verify_never_raises_on_garbage(self, signer: Signer, garbage: bytes) -> None:
        kid, _, _ = await signer.sign(_INPUT)
        assert await signer.verify(kid, garbage, garbage) is False


__all__ = ["RotateSigner", "SignerConformance"]
