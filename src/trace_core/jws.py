"""Compact JWS for capability tokens: encode with a ``Signer``, verify with pinned public keys.

This is the only kernel module that imports PyJWT and ``cryptography``. The claim rules live in
``trace_core.token``; this module adds the envelope.

Theory of operation
-------------------

* **Encoding** builds the header ``{"alg", "kid", "typ"}`` and the signing input with the
  standard library, and asks the ``Signer`` for the signature. The Signer port reports the
  ``(kid, alg)`` it signed with only *after* signing, so the header is built from a hint (the
  last pair seen, or a probe signature); if the signer answers with another key (it rotated in
  between), the token is re-signed with the new header. ``TokenIssuer`` keeps the hint.
* **Verification** trusts nothing in the token before the signature checks out, except the
  ``kid`` used to pick a key: the algorithm is the one *pinned to the key* (never the header's),
  PyJWT is called with exactly that one algorithm and a loaded key object (so ``alg: none`` and
  HMAC-with-the-public-key confusion cannot work), the header may carry only ``alg``, ``kid``
  and ``typ``, and ``typ`` must match the policy. Time rules are checked by
  ``trace_core.token.check_claims`` with the caller's ``now`` (PyJWT's own time checks are off,
  so nothing here reads the clock).
* Every failure is ``Unauthenticated`` with a generic message; PyJWT's exceptions never escape.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
from collections import OrderedDict
from collections.abc import Mapping
from functools import lru_cache
from typing import Any, Final

import jwt
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
#: Claims PyJWT must find before Trace's own checks run.
_REQUIRED: Final = ["exp", "iat", "iss", "aud", "sub"]
_P256_BYTES: Final = 32

PrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey
VerifyingKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey


# --------------------------------------------------------------------------------------------
# Key helpers shared by the signer adapters


def b64url_encode(data: bytes) -> str:
    """Base64url without padding (RFC 7515 §2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Decode unpadded base64url. Raises ``Unauthenticated`` for invalid input."""
    try:
        raw = text.encode("ascii")
        return base64.urlsafe_b64decode(raw + b"=" * (-len(raw) % 4))
    except (UnicodeEncodeError, binascii.Error, ValueError) as exc:
        raise Unauthenticated("capability token: malformed") from exc


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


def unverified_kid(token: str) -> str:
    """The ``kid`` from a token's header, *unverified*. Raises ``Unauthenticated``."""
    header = _unverified_header(token)
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise Unauthenticated("capability token: no key id")
    return kid


def _unverified_header(token: str) -> dict[str, Any]:
    if not isinstance(token, str) or token.count(".") != 2:
        raise Unauthenticated("capability token: malformed")
    try:
        header = json.loads(b64url_decode(token.split(".", 1)[0]))
    except (ValueError, UnicodeDecodeError) as exc:
        raise Unauthenticated("capability token: malformed") from exc
    if not isinstance(header, dict):
        raise Unauthenticated("capability token: malformed")
    return header


def verify_token(
    token: str,
    keys: Mapping[str, PublicKey],
    policy: TokenPolicy,
    now_epoch: int,
) -> CapabilityClaims:
    """Verify a capability token's signature, header and claims at ``now_epoch``.

    ``keys`` maps kid to the published ``PublicKey``; the key's pinned algorithm is the only
    one accepted. Returns the claims. Raises ``Unauthenticated`` for anything wrong: malformed
    token, unknown kid, algorithm other than the pinned one, bad signature, unexpected header
    parameter, wrong ``typ``, or any claim rule of ``check_claims``.
    """
    header = _unverified_header(token)
    kid = unverified_kid(token)
    public = keys.get(kid)
    if public is None:
        raise Unauthenticated("capability token: unknown key id")
    if set(header) - _ALLOWED_HEADER:
        raise Unauthenticated("capability token: unexpected header parameter")
    if header.get("alg") != public.algorithm:
        raise Unauthenticated("capability token: algorithm does not match the key")
    if header.get("typ") != policy.typ:
        raise Unauthenticated("capability token: wrong type")
    key = load_public_key(public.public_pem, public.algorithm)
    try:
        payload = jwt.decode(
            token,
            key=key,
            algorithms=[public.algorithm],
            audience=policy.audience,
            issuer=policy.issuer,
            options={
                "require": _REQUIRED,
                "verify_signature": True,
                "verify_exp": False,
                "verify_iat": False,
                "verify_nbf": False,
            },
        )
    except (jwt.PyJWTError, ValueError, TypeError) as exc:
        raise Unauthenticated("capability token: does not verify") from exc
    return check_claims(policy, payload, now_epoch)


class TokenVerifier:
    """Verifies capability tokens with public keys fetched from a ``Signer`` and cached.

    An unknown kid triggers a refresh of the key set, at most once per ``refresh_interval_s``
    of the caller's monotonic clock (a flood of tokens with made-up kids cannot hammer the
    signer, e.g. KMS).
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
        # Tokens this process minted itself, by exact text: their signature is known good, so
        # verifying one is a lookup plus the time checks (bounded, oldest dropped first).
        self._minted: OrderedDict[str, CapabilityClaims] = OrderedDict()
        self.minted_capacity = 50_000

    def remember(self, token: str, claims: CapabilityClaims) -> None:
        """Record a token this process just signed, so verifying it skips the signature."""
        self._minted[token] = claims
        if len(self._minted) > self.minted_capacity:
            self._minted.popitem(last=False)

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
        minted = self._minted.get(token)
        if minted is not None:  # byte-for-byte a token we signed: only the time checks remain
            return check_claims(self.policy, minted.to_payload(), now_epoch)
        kid = unverified_kid(token)
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
        return verify_token(token, self._keys, self.policy, now_epoch)


__all__ = [
    "SUPPORTED_ALGORITHMS",
    "TokenIssuer",
    "TokenVerifier",
    "algorithm_for",
    "b64url_decode",
    "b64url_encode",
    "encode_token",
    "kid_for",
    "load_public_key",
    "public_key_for",
    "raw_public_bytes",
    "sign_jws",
    "unverified_kid",
    "verify_jws",
    "verify_token",
]
