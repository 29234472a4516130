"""Compact JWS, sans-IO: build signing inputs, assemble tokens, verify with pinned keys.

Used for capability tokens (claims in ``trace_core.token``) and for user JWTs
(``trace_lite.users``): both go through ``parse`` and ``verify_signature``. Nothing here
performs I/O, awaits, caches or reads the clock; the issuer and verifier that talk to a
``Signer`` and remember results live in ``trace_lite.capabilities``. This is the only kernel
module that imports ``cryptography`` (pure computation).

Theory of operation
-------------------

* **Encoding**: ``header_for`` + ``signing_input`` give the bytes to sign (compact JSON, sorted
  keys, canonical base64url); a ``Signer`` signs them; ``assemble`` joins the three segments.
* **Parsing** accepts only canonical unpadded base64url in every segment (no ``=``, no
  characters outside the url-safe alphabet, no non-zero trailing bits) and JSON objects
  without duplicate member names, so one token has exactly one spelling and
  ``ParsedJws.digest`` identifies what is verified.
* **Verification** trusts nothing in the token before the signature checks out, except the
  ``kid`` used to pick a key: the algorithm is the one *pinned to the key* (never the header's,
  so ``alg: none`` and HMAC-with-the-public-key confusion cannot work), the header may carry
  only ``alg``, ``kid`` and ``typ``, and ``typ`` must be the expected one. Time rules are
  checked with the caller's ``now`` (``trace_core.token.check_claims`` for capability tokens).
* Every failure is ``Unauthenticated`` with a generic message.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Mapping
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
from trace_core.ports import PublicKey
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
        raise Unauthenticated("token: malformed base64url")
    raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if b64url_encode(raw) != text:  # non-zero trailing bits: another spelling of ``raw``
        raise Unauthenticated("token: malformed base64url")
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


def load_public_key(public_pem: bytes, algorithm: str) -> VerifyingKey:
    """Load a PEM public key and check it fits its pinned algorithm.

    Raises ``Unauthenticated`` for an unsupported algorithm, an unreadable PEM, or a key type
    that does not match the algorithm (an Ed25519 key pinned to ES256, a P-384 key...).
    """
    if algorithm not in SUPPORTED_ALGORITHMS:
        raise Unauthenticated("token: unsupported key algorithm")
    try:
        key = serialization.load_pem_public_key(public_pem)
    except (ValueError, TypeError) as exc:
        raise Unauthenticated("token: unusable verification key") from exc
    if algorithm == "EdDSA" and isinstance(key, ed25519.Ed25519PublicKey):
        return key
    if (
        algorithm == "ES256"
        and isinstance(key, ec.EllipticCurvePublicKey)
        and isinstance(key.curve, ec.SECP256R1)
    ):
        return key
    raise Unauthenticated("token: key does not match its pinned algorithm")


# --------------------------------------------------------------------------------------------
# Encoding


def _json_segment(value: Mapping[str, Any]) -> str:
    return b64url_encode(json.dumps(value, separators=(",", ":"), sort_keys=True).encode())


def header_for(kid: str, algorithm: str, typ: str) -> dict[str, str]:
    """The JWS header Trace writes: exactly ``alg``, ``kid`` and ``typ``."""
    return {"alg": algorithm, "kid": kid, "typ": typ}


def signing_input(header: Mapping[str, Any], payload: Mapping[str, Any]) -> bytes:
    """``BASE64URL(header) || "." || BASE64URL(payload)`` of compact JSON: what is signed."""
    return f"{_json_segment(header)}.{_json_segment(payload)}".encode("ascii")


def assemble(signed: bytes, signature: bytes) -> str:
    """The compact JWS from a signing input and its JWS-form signature."""
    return f"{signed.decode('ascii')}.{b64url_encode(signature)}"


def token_digest(signed: bytes, signature: bytes) -> bytes:
    """SHA-256 over a signing input, ``.`` and its signature: the identity of a token by what
    is verified (``SplitJws.digest``), known to its signer without parsing it back."""
    h = hashlib.sha256(signed)
    h.update(b".")
    h.update(signature)
    return h.digest()


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
    #: What the token is, for error messages (``capability token``, ``user token``).
    label: str = "capability token"

    @property
    def digest(self) -> bytes:
        """``SplitJws.digest`` of this token: what is verified, not how it was spelled."""
        return token_digest(self.signing_input, self.signature)

    @property
    def kid(self) -> str:
        """The header's ``kid``, unverified. Raises ``Unauthenticated`` if missing."""
        kid = self.header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise Unauthenticated(f"{self.label}: no key id")
        return kid


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate member name")
    return out


def _json_object(raw: bytes, label: str) -> dict[str, Any]:
    try:
        value = json.loads(raw, object_pairs_hook=_no_duplicate_keys)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise Unauthenticated(f"{label}: malformed") from exc
    if not isinstance(value, dict):
        raise Unauthenticated(f"{label}: malformed")
    return value


@attrs.frozen
class SplitJws:
    """A compact JWS split into its canonical-base64url-decoded parts; nothing checked yet."""

    #: The decoded header bytes (JSON not parsed).
    header: bytes
    #: The decoded payload bytes (JSON not parsed).
    payload: bytes
    #: ``BASE64URL(header) || "." || BASE64URL(payload)``: the bytes the signature covers.
    signing_input: bytes
    #: The decoded signature.
    signature: bytes

    @property
    def digest(self) -> bytes:
        """SHA-256 over what the signature covers and the signature: the identity of what is
        verified. Canonical decoding makes it one-to-one with the token text."""
        return token_digest(self.signing_input, self.signature)


def split(token: str, *, label: str = "capability token") -> SplitJws:
    """Split a compact JWS and decode its three segments (canonical base64url only).

    Cheaper than ``parse`` (no JSON): enough to look a token up by ``digest``. Raises
    ``Unauthenticated`` unless the token is three canonical base64url segments.
    """
    if not isinstance(token, str) or token.count(".") != 2:
        raise Unauthenticated(f"{label}: malformed")
    header_segment, payload_segment, signature_segment = token.split(".")
    try:
        header = b64url_decode(header_segment)
        payload = b64url_decode(payload_segment)
        signature = b64url_decode(signature_segment)
    except Unauthenticated as exc:
        raise Unauthenticated(f"{label}: malformed") from exc
    return SplitJws(
        header=header,
        payload=payload,
        signing_input=f"{header_segment}.{payload_segment}".encode("ascii"),
        signature=signature,
    )


def parse(token: str, *, label: str = "capability token") -> ParsedJws:
    """Split a compact JWS and decode its segments: canonical base64url, JSON objects.

    Returns the parsed token; nothing in it is trusted yet. Raises ``Unauthenticated`` for a
    token that is not three canonical base64url segments with JSON objects for header and
    payload (duplicate member names refused). ``label`` names the token in error messages.
    """
    parts = split(token, label=label)
    return ParsedJws(
        header=_json_object(parts.header, label),
        payload=_json_object(parts.payload, label),
        signing_input=parts.signing_input,
        signature=parts.signature,
        label=label,
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
        raise Unauthenticated(f"{parsed.label}: unknown key id")
    header = parsed.header
    if set(header) - _ALLOWED_HEADER:
        raise Unauthenticated(f"{parsed.label}: unexpected header parameter")
    if header.get("alg") != public.algorithm:
        raise Unauthenticated(f"{parsed.label}: algorithm does not match the key")
    if header.get("typ") != typ:
        raise Unauthenticated(f"{parsed.label}: wrong type")
    key = load_public_key(public.public_pem, public.algorithm)
    if not verify_jws(key, parsed.signing_input, parsed.signature):
        raise Unauthenticated(f"{parsed.label}: does not verify")
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


__all__ = [
    "SUPPORTED_ALGORITHMS",
    "ParsedJws",
    "SplitJws",
    "algorithm_for",
    "assemble",
    "b64url_decode",
    "b64url_encode",
    "header_for",
    "kid_for",
    "load_public_key",
    "parse",
    "public_key_for",
    "raw_public_bytes",
    "sign_jws",
    "signing_input",
    "split",
    "token_digest",
    "unverified_kid",
    "verify_jws",
    "verify_signature",
    "verify_token",
]
