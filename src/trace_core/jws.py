"""Compact JWS for capability tokens: encode with a ``Signer``, verify with pinned public keys.

This is the only kernel module that imports ``cryptography``. The claim rules live in
``trace_core.token``; this module adds the envelope.

Theory of operation
-------------------

* **Encoding** builds the header ``{"alg", "kid", "typ"}`` and the signing input with the
  standard library, and asks the ``Signer`` for the signature. The Signer port reports the
  ``(kid, alg)`` it signed with only *after* signing, so the header is built from a hint (the
  last pair seen, or a probe signature); if the signer answers with another key (it rotated in
  between), the token is re-signed with the new header. ``TokenIssuer`` keeps the hint.
* **Parsing** accepts only canonical unpadded base64url in every segment (no ``=``, no
  non-zero trailing bits) and JSON objects without duplicate member names, so one token has
  exactly one spelling: a verification result can be remembered by what was verified.
* **Verification** trusts nothing in the token before the signature checks out, except the
  ``kid`` used to pick a key: the algorithm is the one *pinned to the key* (never the header's,
  so ``alg: none`` and HMAC-with-the-public-key confusion cannot work), the header may carry
  only ``alg``, ``kid`` and ``typ``, and ``typ`` must match the policy. Time rules are checked
  by ``trace_core.token.check_claims`` with the caller's ``now`` (nothing here reads the clock).
* Every failure is ``Unauthenticated`` with a generic message.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
from collections import OrderedDict
from collections.abc import Mapping
from functools import lru_cache
from typing import Any, Final

import attrs
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from trace_core.errors import SignerError, Unauthenticated
from trace_core.ports import PublicKey, Signer
from trace_core.token import CapabilityClaims, TokenPolicy, check_claims

#: Algorithms a Trace signing key may be pinned to.
SUPPORTED_ALGORITHMS: Final = frozenset({"EdDSA", "ES256"})
#: Header parameters a capability token may carry; anything else (``crit``, ``jku``, ``jwk``,
#: ``x5u``, ``b64`` ...) is refused.
_ALLOWED_HEADER: Final = frozenset({"alg", "kid", "typ"})
_P256_BYTES: Final = 32
#: Canonical unpadded base64url text (the length rule is checked separately).
_B64URL: Final = re.compile(r"[A-Za-z0-9_-]*")

PrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey
VerifyingKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey


# --------------------------------------------------------------------------------------------
# Key helpers shared by the signer adapters


def b64url_encode(data: bytes) -> str:
    """Base64url without padding (RFC 7515 §2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Decode *canonical* unpadded base64url (RFC 7515 §2).

    Only the form ``b64url_encode`` produces is accepted: no padding, no characters outside
    ``A-Z a-z 0-9 - _``, and unused trailing bits zero. So each byte string has exactly one
    accepted text and a token cannot be re-spelled (``sig==``, a flipped low bit) and still
    verify. Raises ``Unauthenticated`` for anything else.
    """
    if not isinstance(text, str) or not _B64URL.fullmatch(text) or len(text) % 4 == 1:
        raise Unauthenticated("capability token: malformed")
    raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if b64url_encode(raw) != text:  # non-zero trailing bits: another spelling of ``raw``
        raise Unauthenticated("capability token: malformed")
    return raw


def raw_public_bytes(public_key: VerifyingKey) -> bytes:
    """The raw public key: 32 bytes for Ed25519, the uncompressed point for P-256."""
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return public_key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )


def kid_for(public_key: VerifyingKey) -> str:
    """Key id: the first 16 hex characters of SHA-256 of the raw public key."""
    return hashlib.sha256(raw_public_bytes(public_key)).hexdigest()[:16]


def algorithm_for(private_key: PrivateKey) -> str:
    """The JWS algorithm pinned to a private key. Raises ``SignerError`` for other key types."""
    if isinstance(private_key, ed25519.Ed25519PrivateKey):
        return "EdDSA"
    if isinstance(private_key.curve, ec.SECP256R1):
        return "ES256"
    raise SignerError(f"unsupported signing key curve {private_key.curve.name}")


def public_key_for(private_key: PrivateKey) -> PublicKey:
    """The ``PublicKey`` record (kid, pinned algorithm, SPKI PEM) for a private key."""
    public = private_key.public_key()
    pem = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return PublicKey(kid=kid_for(public), algorithm=algorithm_for(private_key), public_pem=pem)


def sign_jws(private_key: PrivateKey, signing_input: bytes) -> bytes:
    """Sign in JWS form: Ed25519 bytes, or raw ``r||s`` (64 bytes) for ES256."""
    if isinstance(private_key, ed25519.Ed25519PrivateKey):
        return private_key.sign(signing_input)
    der = private_key.sign(signing_input, ec.ECDSA(hashes.SHA256()))
    r, s = decode_dss_signature(der)
    return r.to_bytes(_P256_BYTES, "big") + s.to_bytes(_P256_BYTES, "big")


def verify_jws(public_key: VerifyingKey, signing_input: bytes, signature: bytes) -> bool:
    """Whether a JWS-form signature verifies. Never raises for bad input."""
    try:
        if isinstance(public_key, ed25519.Ed25519PublicKey):
            public_key.verify(signature, signing_input)
            return True
        if len(signature) != 2 * _P256_BYTES:
            return False
        r = int.from_bytes(signature[:_P256_BYTES], "big")
        s = int.from_bytes(signature[_P256_BYTES:], "big")
        public_key.verify(encode_dss_signature(r, s), signing_input, ec.ECDSA(hashes.SHA256()))
        return True
    except (InvalidSignature, ValueError):
        return False


@lru_cache(maxsize=256)
def load_public_key(public_pem: bytes, algorithm: str) -> VerifyingKey:
    """Load a PEM public key and check it fits its pinned algorithm.

    Raises ``Unauthenticated`` for an unsupported algorithm, an unreadable PEM, or a key type
    that does not match the algorithm (an Ed25519 key pinned to ES256, a P-384 key...).
    """
    if algorithm not in SUPPORTED_ALGORITHMS:
        raise Unauthenticated("capability token: unsupported key algorithm")
    try:
        key = serialization.load_pem_public_key(public_pem)
    except (ValueError, TypeError) as exc:
        raise Unauthenticated("capability token: unusable verification key") from exc
    if algorithm == "EdDSA" and isinstance(key, ed25519.Ed25519PublicKey):
        return key
    if (
        algorithm == "ES256"
        and isinstance(key, ec.EllipticCurvePublicKey)
        and isinstance(key.curve, ec.SECP256R1)
    ):
        return key
    raise Unauthenticated("capability token: key does not match its pinned algorithm")


# --------------------------------------------------------------------------------------------
# Encoding


def _json_segment(value: Mapping[str, Any]) -> str:
    return b64url_encode(json.dumps(value, separators=(",", ":"), sort_keys=True).encode())


async def encode_token(
    claims: CapabilityClaims,
    signer: Signer,
    *,
    key_hint: tuple[str, str] | None = None,
) -> str:
    """Encode and sign ``claims`` as a compact JWS.

    ``key_hint`` is the ``(kid, alg)`` the signer is expected to sign with; without one, a
    probe signature discovers it (one extra ``sign`` call — use ``TokenIssuer`` to avoid it).
    Returns the token. Raises ``SignerError`` if the signer fails or keeps changing keys.
    """
    token, _ = await _encode(claims, signer, key_hint)
    return token


async def _encode(
    claims: CapabilityClaims, signer: Signer, key_hint: tuple[str, str] | None
) -> tuple[str, tuple[str, str]]:
    if key_hint is None:
        kid, alg, _ = await signer.sign(b"trace-jws-key-probe")
        key_hint = (kid, alg)
    payload_segment = _json_segment(claims.to_payload())
    for _ in range(3):
        kid, alg = key_hint
        header = {"alg": alg, "kid": kid, "typ": claims.typ}
        signing_input = f"{_json_segment(header)}.{payload_segment}".encode("ascii")
        signed_kid, signed_alg, signature = await signer.sign(signing_input)
        if (signed_kid, signed_alg) == key_hint:
            return f"{signing_input.decode('ascii')}.{b64url_encode(signature)}", key_hint
        key_hint = (signed_kid, signed_alg)  # the signer rotated: re-sign with its new key
    raise SignerError("the signer changed keys on every attempt")


class TokenIssuer:
    """Encodes tokens with a ``Signer``, remembering the key it signs with.

    Not a state machine: a thin cache that saves the probe signature on every call.
    """

    def __init__(self, signer: Signer) -> None:
        self._signer = signer
        self._hint: tuple[str, str] | None = None

    async def encode(self, claims: CapabilityClaims) -> str:
        """Encode and sign ``claims``. Returns the token. Raises ``SignerError``."""
        token, self._hint = await _encode(claims, self._signer, self._hint)
        return token


# --------------------------------------------------------------------------------------------
# Verification


@attrs.frozen
class ParsedJws:
    """A compact JWS split and decoded, its signature *not yet checked*."""

    #: The decoded header object.
    header: dict[str, Any]
    #: The decoded payload object.
    payload: dict[str, Any]
    #: ``BASE64URL(header) || "." || BASE64URL(payload)``: the bytes the signature covers.
    signing_input: bytes
    #: The decoded signature.
    signature: bytes

    @property
    def digest(self) -> bytes:
        """SHA-256 over what the signature covers and the signature: the identity of what is
        verified. Canonical decoding makes it one-to-one with the token text."""
        h = hashlib.sha256(self.signing_input)
        h.update(b".")
        h.update(self.signature)
        return h.digest()

    @property
    def kid(self) -> str:
        """The header's ``kid``, unverified. Raises ``Unauthenticated`` if missing."""
        kid = self.header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise Unauthenticated("capability token: no key id")
        return kid


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate member name")
    return out


def _json_object(segment: str) -> dict[str, Any]:
    try:
        value = json.loads(b64url_decode(segment), object_pairs_hook=_no_duplicate_keys)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise Unauthenticated("capability token: malformed") from exc
    if not isinstance(value, dict):
        raise Unauthenticated("capability token: malformed")
    return value


def parse(token: str) -> ParsedJws:
    """Split a compact JWS and decode its three segments (canonical base64url only).

    Returns the parsed token; nothing in it is trusted yet. Raises ``Unauthenticated`` for a
    token that is not three canonical base64url segments with JSON objects for header and
    payload (duplicate member names refused).
    """
    if not isinstance(token, str) or token.count(".") != 2:
        raise Unauthenticated("capability token: malformed")
    header_segment, payload_segment, signature_segment = token.split(".")
    return ParsedJws(
        header=_json_object(header_segment),
        payload=_json_object(payload_segment),
        signing_input=f"{header_segment}.{payload_segment}".encode("ascii"),
        signature=b64url_decode(signature_segment),
    )


def unverified_kid(token: str) -> str:
    """The ``kid`` from a token's header, *unverified*. Raises ``Unauthenticated``."""
    return parse(token).kid


def verify_signature(parsed: ParsedJws, keys: Mapping[str, PublicKey], typ: str) -> str:
    """Check a parsed token's header and signature against pinned keys.

    The key is the one ``kid`` names in ``keys``; the algorithm is the one pinned to that key
    (the header's ``alg`` must equal it, so ``none`` and HMAC-with-the-public-key cannot
    work); the header may carry only ``alg``, ``kid`` and ``typ``, and ``typ`` must equal
    ``typ``. Returns the kid. Raises ``Unauthenticated`` for any failure.
    """
    public = keys.get(parsed.kid)
    if public is None:
        raise Unauthenticated("capability token: unknown key id")
    header = parsed.header
    if set(header) - _ALLOWED_HEADER:
        raise Unauthenticated("capability token: unexpected header parameter")
    if header.get("alg") != public.algorithm:
        raise Unauthenticated("capability token: algorithm does not match the key")
    if header.get("typ") != typ:
        raise Unauthenticated("capability token: wrong type")
    key = load_public_key(public.public_pem, public.algorithm)
    if not verify_jws(key, parsed.signing_input, parsed.signature):
        raise Unauthenticated("capability token: does not verify")
    return public.kid


def verify_token(
    token: str,
    keys: Mapping[str, PublicKey],
    policy: TokenPolicy,
    now_epoch: int,
) -> CapabilityClaims:
    """Verify a capability token's signature, header and claims at ``now_epoch``.

    ``keys`` maps kid to the published ``PublicKey``; the key's pinned algorithm is the only
    one accepted. Returns the claims. Raises ``Unauthenticated`` for anything wrong: malformed
    or non-canonical token, unknown kid, algorithm other than the pinned one, bad signature,
    unexpected header parameter, wrong ``typ``, or any claim rule of ``check_claims``.
    """
    parsed = parse(token)
    verify_signature(parsed, keys, policy.typ)
    return check_claims(policy, parsed.payload, now_epoch)


class TokenVerifier:
    """Verifies capability tokens with public keys fetched from a ``Signer`` and cached.

    An unknown kid triggers a refresh of the key set, at most once per ``refresh_interval_s``
    of the caller's monotonic clock (a flood of tokens with made-up kids cannot hammer the
    signer, e.g. KMS).

    Verified tokens (and tokens this process minted) are remembered by what was verified --
    ``ParsedJws.digest``, over the decoded signing input and signature -- never by the token
    text, so a re-spelled token cannot reuse another's result; a remembered token still goes
    through the time checks on every call.
    """

    def __init__(
        self,
        signer: Signer,
        policy: TokenPolicy | None = None,
        *,
        refresh_interval_s: float = 30.0,
    ) -> None:
        self._signer = signer
        self.policy = policy or TokenPolicy()
        self._refresh_interval_s = refresh_interval_s
        self._keys: dict[str, PublicKey] = {}
        self._last_refresh: float | None = None
        self._lock = asyncio.Lock()
        #: How many times the key set was fetched (for tests and metrics).
        self.refresh_count = 0
        # Signature-checked tokens by digest -> (kid, claims); bounded, oldest dropped first.
        self._verified: OrderedDict[bytes, tuple[str, CapabilityClaims]] = OrderedDict()
        self.verified_capacity = 50_000

    def _store(self, digest: bytes, kid: str, claims: CapabilityClaims) -> None:
        self._verified[digest] = (kid, claims)
        if len(self._verified) > self.verified_capacity:
            self._verified.popitem(last=False)

    def remember(self, token: str, claims: CapabilityClaims) -> None:
        """Record a token this process just signed, so verifying it skips the signature."""
        parsed = parse(token)
        self._store(parsed.digest, parsed.kid, claims)

    @property
    def keys(self) -> Mapping[str, PublicKey]:
        """The cached key set, by kid."""
        return dict(self._keys)

    async def refresh(self, monotonic: float) -> None:
        """Fetch the signer's public keys now. Raises ``SignerError`` if the signer fails."""
        async with self._lock:
            await self._refresh_locked(monotonic)

    async def _refresh_locked(self, monotonic: float) -> None:
        keys = await self._signer.public_keys()
        self._keys = {k.kid: k for k in keys}
        self._last_refresh = monotonic
        self.refresh_count += 1

    async def verify(self, token: str, *, now_epoch: int, monotonic: float) -> CapabilityClaims:
        """Verify ``token`` at ``now_epoch``; refresh keys on an unknown kid if allowed.

        Returns the claims. Raises ``Unauthenticated`` (see ``verify_token``); a signer failure
        during refresh is also reported as ``Unauthenticated`` (the token could not be checked).
        """
        parsed = parse(token)
        known = self._verified.get(parsed.digest)
        if known is not None:  # these exact bytes were verified (or signed) here before
            return check_claims(self.policy, known[1].to_payload(), now_epoch)
        kid = parsed.kid
        if kid not in self._keys:
            async with self._lock:
                due = (
                    self._last_refresh is None
                    or monotonic - self._last_refresh >= self._refresh_interval_s
                )
                if kid not in self._keys and due:
                    try:
                        await self._refresh_locked(monotonic)
                    except SignerError as exc:
                        raise Unauthenticated("capability token: keys unavailable") from exc
        verify_signature(parsed, self._keys, self.policy.typ)
        claims = check_claims(self.policy, parsed.payload, now_epoch)
        self._store(parsed.digest, kid, claims)
        return claims


__all__ = [
    "SUPPORTED_ALGORITHMS",
    "ParsedJws",
    "TokenIssuer",
    "TokenVerifier",
    "algorithm_for",
    "b64url_decode",
    "b64url_encode",
    "encode_token",
    "kid_for",
    "load_public_key",
    "parse",
    "public_key_for",
    "raw_public_bytes",
    "sign_jws",
    "unverified_kid",
    "verify_jws",
    "verify_signature",
    "verify_token",
]
