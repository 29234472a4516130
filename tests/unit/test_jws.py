"""JWS encode/verify with EdDSA and ES256 memory signers, and attacks crafted by hand."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
from typing import Any

import attrs
import jwt
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from trace_core.errors import NotFound, SignerError, Unauthenticated
from trace_core.jws import (
    assemble,
    b64url_decode,
    b64url_encode,
    header_for,
    kid_for,
    load_public_key,
    sign_jws,
    signing_input,
    unverified_kid,
    verify_token,
)
from trace_core.ports import PublicKey
from trace_core.testing.memory_signer import MemorySigner, generate_private_key
from trace_core.token import CapabilityClaims, TokenPolicy, issue_claims
from trace_lite.capabilities import TokenIssuer, TokenVerifier, encode_token

POLICY = TokenPolicy()
NOW = 1_800_000_000


@pytest.fixture(params=["EdDSA", "ES256"])
def signer(request: pytest.FixtureRequest) -> MemorySigner:
    return MemorySigner(request.param)


def _claims(**overrides: Any) -> CapabilityClaims:
    c = issue_claims(
        POLICY,
        org_id="org-1",
        task_id="task-1",
        attempt=1,
        attempt_timeout_s=60,
        now_epoch=NOW,
        jti="jti-1",
    )
    return attrs.evolve(c, **overrides) if overrides else c


async def _keys(signer: MemorySigner) -> dict[str, PublicKey]:
    return {k.kid: k for k in await signer.public_keys()}


def _seg(value: Any) -> str:
    return b64url_encode(json.dumps(value).encode())


async def _craft(signer: MemorySigner, header: dict[str, Any], payload: dict[str, Any]) -> str:
    """A token with an arbitrary header, genuinely signed by the signer's current key."""
    signing_input = f"{_seg(header)}.{_seg(payload)}".encode()
    _, _, sig = await signer.sign(signing_input)
    return f"{signing_input.decode()}.{b64url_encode(sig)}"


def _header(signer: MemorySigner, **overrides: Any) -> dict[str, Any]:
    header = {"alg": signer.algorithm, "kid": signer.current_kid, "typ": POLICY.typ}
    header.update(overrides)
    return {k: v for k, v in header.items() if v is not None}


# -- roundtrip ----------------------------------------------------------------------------------


async def test_roundtrip(signer: MemorySigner) -> None:
    token = await encode_token(_claims(), signer)
    header = json.loads(b64url_decode(token.split(".")[0]))
    assert header == {"alg": signer.algorithm, "kid": signer.current_kid, "typ": POLICY.typ}
    assert verify_token(token, await _keys(signer), POLICY, NOW) == _claims()
    assert unverified_kid(token) == signer.current_kid


async def test_pyjwt_agrees_with_our_encoding(signer: MemorySigner) -> None:
    token = await encode_token(_claims(grants={"prefix": "org/1/"}), signer)
    key = (await _keys(signer))[signer.current_kid]
    decoded = jwt.decode(
        token,
        key=load_public_key(key.public_pem, key.algorithm),
        algorithms=[key.algorithm],
        audience=POLICY.audience,
        options={"verify_exp": False, "verify_iat": False},
    )
    assert decoded["grants"] == {"prefix": "org/1/"}


async def test_grants_survive_the_roundtrip(signer: MemorySigner) -> None:
    claims = _claims(grants={"prefix": "org/1/scratch/", "n": 3})
    token = await encode_token(claims, signer)
    assert verify_token(token, await _keys(signer), POLICY, NOW) == claims


async def test_time_rules_use_the_passed_in_now(signer: MemorySigner) -> None:
    c = _claims()
    token = await encode_token(c, signer)
    keys = await _keys(signer)
    verify_token(token, keys, POLICY, c.exp + POLICY.leeway_s - 1)
    with pytest.raises(Unauthenticated):
        verify_token(token, keys, POLICY, c.exp + POLICY.leeway_s)
    with pytest.raises(Unauthenticated):
        verify_token(token, keys, POLICY, NOW - POLICY.leeway_s - 1)


async def test_key_hint_mismatch_re_signs_with_the_signers_key(signer: MemorySigner) -> None:
    token = await encode_token(_claims(), signer, key_hint=("stale-kid", "EdDSA"))
    assert unverified_kid(token) == signer.current_kid
    verify_token(token, await _keys(signer), POLICY, NOW)


async def test_issuer_follows_rotation_and_old_tokens_still_verify(signer: MemorySigner) -> None:
    issuer = TokenIssuer(signer)
    old = await issuer.encode(_claims())
    keys_before = await _keys(signer)
    signer.rotate(force=True)
    new = await issuer.encode(_claims(jti="jti-2"))
    assert unverified_kid(new) == signer.current_kid != unverified_kid(old)
    # The new current key was published as next before, so a verifier that fetched keys
    # before the rotation already trusts it.
    verify_token(new, keys_before, POLICY, NOW)
    keys_after = await _keys(signer)
    verify_token(old, keys_after, POLICY, NOW)


async def test_signer_failure_is_a_signer_error(signer: MemorySigner) -> None:
    signer.fail_next_sign(SignerError("kms down"))
    with pytest.raises(SignerError):
        await encode_token(_claims(), signer, key_hint=(signer.current_kid, signer.algorithm))


async def test_a_signer_that_keeps_changing_keys_is_refused() -> None:
    class Flapping:
        n = 0

        async def sign(self, signing_input: bytes) -> tuple[str, str, bytes]:
            self.n += 1
            return f"k{self.n}", "EdDSA", b"sig"

        async def public_keys(self) -> list[PublicKey]:
            return []

        async def verify(self, kid: str, signing_input: bytes, signature: bytes) -> bool:
            return False

    with pytest.raises(SignerError):
        await encode_token(_claims(), Flapping())


# -- attacks --------------------------------------------------------------------------------------


async def test_alg_none_is_refused(signer: MemorySigner) -> None:
    payload = _claims().to_payload()
    for alg in ("none", "None", "NONE"):
        token = f"{_seg(_header(signer, alg=alg))}.{_seg(payload)}."
        with pytest.raises(Unauthenticated):
            verify_token(token, await _keys(signer), POLICY, NOW)


async def test_hs256_with_the_public_key_as_hmac_secret_is_refused(signer: MemorySigner) -> None:
    keys = await _keys(signer)
    pem = keys[signer.current_kid].public_pem
    signing_input = f"{_seg(_header(signer, alg='HS256'))}.{_seg(_claims().to_payload())}"
    for secret in (pem, pem.strip()):
        sig = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
        token = f"{signing_input}.{b64url_encode(sig)}"
        with pytest.raises(Unauthenticated):
            verify_token(token, keys, POLICY, NOW)
    # Even a key record that claims HS256 is never usable.
    bogus = {signer.current_kid: attrs.evolve(keys[signer.current_kid], algorithm="HS256")}
    sig = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
    with pytest.raises(Unauthenticated):
        verify_token(f"{signing_input}.{b64url_encode(sig)}", bogus, POLICY, NOW)


async def test_header_alg_other_than_the_pinned_one_is_refused() -> None:
    ed = MemorySigner("EdDSA")
    es = MemorySigner("ES256")
    keys = {**await _keys(ed), **await _keys(es)}
    payload = _claims().to_payload()
    # Signed by the ES256 key, but naming the Ed25519 key's kid with alg ES256.
    token = await _craft(es, _header(es, kid=ed.current_kid), payload)
    with pytest.raises(Unauthenticated):
        verify_token(token, keys, POLICY, NOW)
    # Correct kid and a genuine signature, but the header lies about the algorithm.
    token = await _craft(ed, _header(ed, alg="ES256"), payload)
    with pytest.raises(Unauthenticated):
        verify_token(token, keys, POLICY, NOW)
    # A key record whose pinned algorithm does not fit the key type is unusable.
    mismatched = {ed.current_kid: attrs.evolve(keys[ed.current_kid], algorithm="ES256")}
    token = await _craft(ed, _header(ed, alg="ES256"), payload)
    with pytest.raises(Unauthenticated):
        verify_token(token, mismatched, POLICY, NOW)


async def test_tampered_payload_is_refused(signer: MemorySigner) -> None:
    token = await encode_token(_claims(), signer)
    header, _, sig = token.split(".")
    for change in ({"attempt": 2}, {"task_id": "task-2"}, {"exp": NOW + 900}, {"org_id": "x"}):
        forged = {**_claims().to_payload(), **change}
        with pytest.raises(Unauthenticated):
            verify_token(f"{header}.{_seg(forged)}.{sig}", await _keys(signer), POLICY, NOW)


async def test_tampered_header_or_signature_is_refused(signer: MemorySigner) -> None:
    token = await encode_token(_claims(), signer)
    header, payload, sig = token.split(".")
    keys = await _keys(signer)
    # Re-encoded header with the same fields in another order: signature no longer matches.
    reordered = b64url_encode(
        json.dumps({"typ": POLICY.typ, "kid": signer.current_kid, "alg": signer.algorithm}).encode()
    )
    raw = bytearray(b64url_decode(sig))
    raw[0] ^= 1
    for bad in (
        f"{reordered}.{payload}.{sig}",
        f"{header}.{payload}.{b64url_encode(bytes(raw))}",
        f"{header}.{payload}.",
        f"{header}.{payload}.{sig[:-4]}",
    ):
        with pytest.raises(Unauthenticated):
            verify_token(bad, keys, POLICY, NOW)


async def test_es256_signature_in_der_form_is_refused() -> None:
    es = MemorySigner("ES256")
    signing_input = f"{_seg(_header(es))}.{_seg(_claims().to_payload())}"
    private = es._private[es.current_kid]
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    der = private.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
    with pytest.raises(Unauthenticated):
        verify_token(f"{signing_input}.{b64url_encode(der)}", await _keys(es), POLICY, NOW)


async def test_wrong_typ_is_refused(signer: MemorySigner) -> None:
    payload = _claims().to_payload()
    keys = await _keys(signer)
    for typ in ("JWT", "trace-user+jwt", None):
        token = await _craft(signer, _header(signer, typ=typ), payload)
        with pytest.raises(Unauthenticated):
            verify_token(token, keys, POLICY, NOW)
    # Right header typ, wrong claim typ.
    token = await _craft(signer, _header(signer), {**payload, "typ": "JWT"})
    with pytest.raises(Unauthenticated):
        verify_token(token, keys, POLICY, NOW)


async def test_user_token_never_passes_as_capability(signer: MemorySigner) -> None:
    payload = {**_claims().to_payload(), "aud": "trace-user", "typ": "trace-user+jwt"}
    token = await _craft(signer, _header(signer, typ="trace-user+jwt"), payload)
    with pytest.raises(Unauthenticated):
        verify_token(token, await _keys(signer), POLICY, NOW)
    token = await _craft(signer, _header(signer), {**_claims().to_payload(), "aud": "trace-user"})
    with pytest.raises(Unauthenticated):
        verify_token(token, await _keys(signer), POLICY, NOW)


@pytest.mark.parametrize(
    "extra",
    [
        {"crit": ["exp"]},
        {"jku": "https://evil.example/jwks"},
        {"jwk": {"kty": "OKP"}},
        {"x5u": "https://evil.example/cert"},
        {"b64": False},
    ],
)
async def test_unexpected_header_parameters_are_refused(
    signer: MemorySigner, extra: dict[str, Any]
) -> None:
    token = await _craft(signer, {**_header(signer), **extra}, _claims().to_payload())
    with pytest.raises(Unauthenticated):
        verify_token(token, await _keys(signer), POLICY, NOW)


async def test_unknown_kid_and_foreign_key_are_refused(signer: MemorySigner) -> None:
    other = MemorySigner(signer.algorithm)
    token = await encode_token(_claims(), other)
    with pytest.raises(Unauthenticated, match="unknown key"):
        verify_token(token, await _keys(signer), POLICY, NOW)
    # A foreign key's signature presented under our kid.
    forged = await _craft(other, _header(other, kid=signer.current_kid), _claims().to_payload())
    with pytest.raises(Unauthenticated):
        verify_token(forged, await _keys(signer), POLICY, NOW)


@pytest.mark.parametrize(
    "token",
    ["", "a", "a.b", "a.b.c.d", "!!!.b.c", "e30.e30.", "W10.e30.e30", 42],
)
async def test_malformed_tokens_are_unauthenticated(signer: MemorySigner, token: Any) -> None:
    with pytest.raises(Unauthenticated):
        verify_token(token, await _keys(signer), POLICY, NOW)


async def test_missing_required_claim_after_valid_signature(signer: MemorySigner) -> None:
    keys = await _keys(signer)
    for name in ("exp", "iat", "iss", "aud", "sub", "org_id", "task_id", "attempt"):
        payload = _claims().to_payload()
        del payload[name]
        token = await _craft(signer, _header(signer), payload)
        with pytest.raises(Unauthenticated):
            verify_token(token, keys, POLICY, NOW)


# -- malleability: one token, one spelling -------------------------------------------------------


def _respell_trailing_bits(segment: str) -> str:
    """The same bytes with a non-zero unused low bit in the last character."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    assert len(segment) % 4 in (2, 3)  # some bits of the last character are unused
    return segment[:-1] + alphabet[alphabet.index(segment[-1]) | 1]


async def _respellings(signer: MemorySigner) -> tuple[str, list[str]]:
    token = await encode_token(_claims(), signer)
    header, payload, sig = token.split(".")
    lenient = base64.urlsafe_b64decode  # what a lax decoder sees: the very same bytes
    assert lenient(_respell_trailing_bits(sig) + "==") == lenient(sig + "==")
    others = [
        f"{header}.{payload}.{sig}==",
        f"{header}.{payload}.{sig}=",
        f"{header}.{payload}.{_respell_trailing_bits(sig)}",
        f"{header}==.{payload}.{sig}" if len(header) % 4 else f"{header}=.{payload}.{sig}",
        f"{header}.{payload}=.{sig}",
        f"{header}.{payload}.{sig.replace('-', '+').replace('_', '/')}",
        f"{header}.{payload}.{sig} ",
    ]
    return token, [o for o in others if o != token]


def test_b64url_decode_accepts_only_the_canonical_spelling() -> None:
    for n in range(12):
        data = bytes(range(200, 200 + n))
        assert b64url_decode(b64url_encode(data)) == data
    assert b64url_decode("QUI") == b"AB"
    for bad in ("QQ==", "QQ=", "QR", "Q", "QUJD=", "Q+/A", "QQ\n", " QQ", "QUJ", "QUJ\u00e9"):
        with pytest.raises(Unauthenticated):
            b64url_decode(bad)


async def test_a_respelled_signature_segment_is_refused(signer: MemorySigner) -> None:
    token, others = await _respellings(signer)
    keys = await _keys(signer)
    assert verify_token(token, keys, POLICY, NOW) == _claims()
    for other in others:
        with pytest.raises(Unauthenticated):
            verify_token(other, keys, POLICY, NOW)


async def test_the_verifier_refuses_respellings_of_a_token_it_verified_or_minted(
    signer: MemorySigner,
) -> None:
    verifier = TokenVerifier(signer, POLICY)
    token, others = await _respellings(signer)
    assert await verifier.verify(token, now_epoch=NOW, monotonic=0.0) == _claims()
    for other in others:
        with pytest.raises(Unauthenticated):
            await verifier.verify(other, now_epoch=NOW, monotonic=0.0)
    minted = TokenVerifier(signer, POLICY)
    minted.remember(token, _claims())
    for other in others:
        with pytest.raises(Unauthenticated):
            await minted.verify(other, now_epoch=NOW, monotonic=0.0)


async def test_duplicate_member_names_are_refused(signer: MemorySigner) -> None:
    payload = json.dumps(_claims().to_payload())
    forged = payload[:-1] + ', "attempt": 7}'
    header = _seg(_header(signer))
    signing_input = f"{header}.{b64url_encode(forged.encode())}".encode()
    _, _, sig = await signer.sign(signing_input)
    with pytest.raises(Unauthenticated):
        verify_token(
            f"{signing_input.decode()}.{b64url_encode(sig)}", await _keys(signer), POLICY, NOW
        )


def test_kid_is_sha256_prefix_of_raw_public_key() -> None:
    private = generate_private_key("EdDSA")
    from cryptography.hazmat.primitives import serialization

    raw = private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    assert kid_for(private.public_key()) == hashlib.sha256(raw).hexdigest()[:16]


# -- TokenVerifier ---------------------------------------------------------------------------------


async def test_verifier_caches_keys(signer: MemorySigner) -> None:
    verifier = TokenVerifier(signer, refresh_interval_s=30)
    token = await encode_token(_claims(), signer)
    for i in range(3):
        await verifier.verify(token, now_epoch=NOW, monotonic=100.0 + i)
    assert verifier.refresh_count == 1


async def test_verifier_refreshes_on_unknown_kid_at_most_once_per_interval(
    signer: MemorySigner,
) -> None:
    verifier = TokenVerifier(signer, refresh_interval_s=30)
    await verifier.refresh(100.0)
    bogus = await encode_token(_claims(), MemorySigner(signer.algorithm))
    for t in (101.0, 110.0, 129.9):
        with pytest.raises(Unauthenticated):
            await verifier.verify(bogus, now_epoch=NOW, monotonic=t)
    assert verifier.refresh_count == 1
    with pytest.raises(Unauthenticated):
        await verifier.verify(bogus, now_epoch=NOW, monotonic=130.0)
    assert verifier.refresh_count == 2


async def test_verifier_picks_up_a_new_key_after_rotation(signer: MemorySigner) -> None:
    verifier = TokenVerifier(signer, refresh_interval_s=30)
    await verifier.refresh(100.0)
    signer.rotate(force=True)
    signer.rotate(force=True)  # two rotations: the signing key was never seen by the verifier
    token = await encode_token(_claims(), signer)
    claims = await verifier.verify(token, now_epoch=NOW, monotonic=200.0)
    assert claims == _claims()
    assert verifier.refresh_count == 2


async def test_verifier_reports_signer_failure_as_unauthenticated(signer: MemorySigner) -> None:
    class Broken(MemorySigner):
        async def public_keys(self) -> list[PublicKey]:
            raise SignerError("down")

    verifier = TokenVerifier(Broken(signer.algorithm))
    token = await encode_token(_claims(), signer)
    with pytest.raises(Unauthenticated):
        await verifier.verify(token, now_epoch=NOW, monotonic=0.0)


async def test_tokens_minted_here_verify_by_lookup_with_time_checks_intact(
    signer: MemorySigner,
) -> None:
    verifier = TokenVerifier(signer, POLICY)
    token = await encode_token(_claims(), signer)
    verifier.remember(token, _claims())
    assert await verifier.verify(token, now_epoch=NOW, monotonic=0.0) == _claims()
    assert verifier.refresh_count == 1  # the key set is still read: its kid must be trusted
    with pytest.raises(Unauthenticated):  # expiry still applies
        await verifier.verify(token, now_epoch=NOW + 3600, monotonic=0.0)
    tampered = token[:-3] + ("AAA" if not token.endswith("AAA") else "BBB")
    with pytest.raises(Unauthenticated):  # any other text takes the signature path
        await verifier.verify(tampered, now_epoch=NOW, monotonic=0.0)
    verifier.verified_capacity = 1
    other = await encode_token(_claims(jti="jti-2"), signer)
    verifier.remember(other, _claims(jti="jti-2"))
    assert len(verifier._verified) == 1  # bounded: the oldest is dropped


# -- key retirement and revocation are never lazy ----------------------------------------------


class _Epoch:
    """A settable epoch clock for the signer's rotation schedule."""

    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


async def test_the_key_set_is_re_read_on_a_timer_not_only_on_unknown_kids() -> None:
    signer = MemorySigner()
    verifier = TokenVerifier(signer, POLICY, refresh_interval_s=1.0)
    token = await encode_token(_claims(), signer)
    for t in (0.0, 0.5, 0.99):
        await verifier.verify(token, now_epoch=NOW, monotonic=t)
    assert verifier.refresh_count == 1
    for t in (1.0, 1.5, 2.0, 3.7):
        await verifier.verify(token, now_epoch=NOW, monotonic=t)
    assert verifier.refresh_count == 4  # at 1.0, 2.0 and 3.7


@pytest.mark.parametrize("algorithm", ["EdDSA", "ES256"])
async def test_a_retired_key_stops_verifying_at_grace_end_even_for_tokens_verified_before(
    algorithm: str,
) -> None:
    clock = _Epoch(NOW)
    signer = MemorySigner(algorithm, clock=clock)
    verifier = TokenVerifier(signer, POLICY, refresh_interval_s=1.0)
    # Signed with the key that is about to retire (as a process that has not seen the rotation
    # yet would), verified and remembered before the rotation.
    old = await encode_token(_claims(), signer)
    assert await verifier.verify(old, now_epoch=NOW, monotonic=0.0) == _claims()
    signer.rotate(force=True)
    clock.t = NOW + signer.ring.grace_s  # the last second of the grace
    assert await verifier.verify(old, now_epoch=NOW, monotonic=10.0) == _claims()
    clock.t = NOW + signer.ring.grace_s + 1  # grace over; no traffic needed to drop the key
    with pytest.raises(Unauthenticated):
        await verifier.verify(old, now_epoch=NOW, monotonic=11.0)
    fresh = await encode_token(_claims(jti="jti-2"), signer)
    assert await verifier.verify(fresh, now_epoch=NOW, monotonic=11.0) == _claims(jti="jti-2")


@pytest.mark.parametrize("which", ["current", "next", "retired"])
async def test_a_revoked_key_stops_verifying_within_one_refresh(
    signer: MemorySigner, which: str
) -> None:
    verifier = TokenVerifier(signer, POLICY, refresh_interval_s=1.0)
    if which == "next":
        # a token signed with the published next key (crafted: it does not sign yet)
        kid = signer.next_kid
        assert kid is not None
        private = signer._private[kid]
        signed = signing_input(
            header_for(kid, signer.algorithm, POLICY.typ), _claims().to_payload()
        )
        token = assemble(signed, sign_jws(private, signed))
    else:
        token = await encode_token(_claims(), signer)
        kid = signer.current_kid
        if which == "retired":
            signer.rotate(force=True)
    minted = TokenVerifier(signer, POLICY, refresh_interval_s=1.0)
    minted.remember(token, _claims())
    for v in (verifier, minted):
        assert await v.verify(token, now_epoch=NOW, monotonic=0.0) == _claims()
    current = signer.revoke(kid)
    assert current != kid and kid not in {k.kid for k in await signer.public_keys()}
    for v in (verifier, minted):  # verified (or minted) before: re-checked against the keys
        with pytest.raises(Unauthenticated):
            await v.verify(token, now_epoch=NOW, monotonic=1.0)
    fresh = await encode_token(_claims(jti="jti-2"), signer)
    assert unverified_kid(fresh) == current
    assert await verifier.verify(fresh, now_epoch=NOW, monotonic=1.0) == _claims(jti="jti-2")


async def test_revoking_an_unknown_kid_is_not_found(signer: MemorySigner) -> None:
    with pytest.raises(NotFound):
        signer.revoke("no-such-kid")


async def test_an_unreadable_signer_is_tolerated_only_for_max_stale(signer: MemorySigner) -> None:
    class Flaky(MemorySigner):
        down = False

        async def public_keys(self) -> list[PublicKey]:
            if self.down:
                raise SignerError("kms down")
            return await super().public_keys()

    flaky = Flaky(signer.algorithm)
    verifier = TokenVerifier(flaky, POLICY, refresh_interval_s=1.0, max_stale_s=30.0)
    token = await encode_token(_claims(), flaky)
    await verifier.verify(token, now_epoch=NOW, monotonic=0.0)
    flaky.down = True
    await verifier.verify(token, now_epoch=NOW, monotonic=30.0)
    with pytest.raises(Unauthenticated, match="keys unavailable"):
        await verifier.verify(token, now_epoch=NOW, monotonic=30.5)
    flaky.down = False
    await verifier.verify(token, now_epoch=NOW, monotonic=31.5)


async def test_concurrent_first_verifications_wait_for_the_key_set() -> None:
    # A fresh verifier under concurrent traffic: every caller waits for the one fetch in flight
    # instead of seeing "no keys yet" (a Dispatcher's first second after start).
    class Slow(MemorySigner):
        async def public_keys(self) -> list[PublicKey]:
            await asyncio.sleep(0.01)
            return await super().public_keys()

    signer = Slow()
    verifier = TokenVerifier(signer, POLICY, refresh_interval_s=1.0)
    token = await encode_token(_claims(), signer)
    results = await asyncio.gather(
        *(verifier.verify(token, now_epoch=NOW, monotonic=0.0) for _ in range(20))
    )
    assert results == [_claims()] * 20
    assert verifier.refresh_count == 1
    # a due refresh in flight does not hold up callers whose keys are still fresh enough
    results = await asyncio.gather(
        *(verifier.verify(token, now_epoch=NOW, monotonic=5.0) for _ in range(20))
    )
    assert results == [_claims()] * 20
    assert verifier.refresh_count == 2
