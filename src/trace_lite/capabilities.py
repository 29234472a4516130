"""Capability tokens with a ``Signer``: the issuer (mint) and the verifier (check, with caches).

The kernel's ``trace_core.jws`` is pure: it builds signing inputs, assembles tokens and checks a
token against a key set it is handed, at a ``now`` it is handed. This module is the part with
state and I/O around it: it awaits the ``Signer``, keeps the key set fresh, and remembers what
it already verified.

Theory of operation
-------------------

* **Issuing.** The Signer port reports the ``(kid, alg)`` it signed with only *after* signing,
  so the header is built from a hint (the last pair seen, or a probe signature); if the signer
  answers with another key (it rotated in between), the token is re-signed with the new
  header. ``TokenIssuer`` keeps the hint.
* **Verifying.** ``TokenVerifier`` holds the signer's published keys. An unknown kid triggers a
  refresh at most once per ``refresh_interval_s`` of the caller's monotonic clock (a flood of
  made-up kids cannot hammer the signer, e.g. KMS). Verified tokens, and tokens this process
  minted, are remembered by ``ParsedJws.digest`` -- what was verified, never the token text --
  and a remembered token still goes through the time checks on every call.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Mapping

from trace_core.errors import SignerError, Unauthenticated
from trace_core.jws import assemble, header_for, parse, signing_input, verify_signature
from trace_core.ports import PublicKey, Signer
from trace_core.token import CapabilityClaims, TokenPolicy, check_claims

#: A signer that answers with another key this many times in a row is refused.
_MAX_KEY_CHANGES = 3


async def encode_token(
    claims: CapabilityClaims,
    signer: Signer,
    *,
    key_hint: tuple[str, str] | None = None,
) -> str:
    """Encode and sign ``claims`` as a compact JWS.

    ``key_hint`` is the ``(kid, alg)`` the signer is expected to sign with; without one, a
    probe signature discovers it (one extra ``sign`` call -- use ``TokenIssuer`` to avoid it).
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
    payload = claims.to_payload()
    for _ in range(_MAX_KEY_CHANGES):
        kid, alg = key_hint
        signed = signing_input(header_for(kid, alg, claims.typ), payload)
        signed_kid, signed_alg, signature = await signer.sign(signed)
        if (signed_kid, signed_alg) == key_hint:
            return assemble(signed, signature), key_hint
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


class TokenVerifier:
    """Verifies capability tokens with public keys fetched from a ``Signer`` and cached."""

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
        #: How many verified tokens are remembered.
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

        Returns the claims. Raises ``Unauthenticated`` (see ``trace_core.jws.verify_token``); a
        signer failure during refresh is also reported as ``Unauthenticated`` (the token could
        not be checked).
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


__all__ = ["TokenIssuer", "TokenVerifier", "encode_token"]
