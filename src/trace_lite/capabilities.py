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
* **Verifying.** ``TokenVerifier`` holds the signer's published keys and re-reads them when
  they are older than ``refresh_interval_s`` (1 s) of the caller's monotonic clock, checked on
  every ``verify``: a key retired past its grace, or revoked (``trace keys revoke``), stops
  verifying within about a second whatever the traffic was before -- there is no state that
  outlives a refresh. A flood of tokens (made-up kids included) costs at most one refresh per
  interval, so it cannot hammer the signer (KMS). If the signer cannot be read, the last key
  set is used for at most ``max_stale_s`` (30 s); after that every token is refused.
* **Remembering.** Verified tokens, and tokens this process minted, are remembered by
  ``ParsedJws.digest`` -- what was verified, never the token text. The issuer knows the digest
  and kid of what it signed (``SignedToken``), so remembering a minted token parses nothing. A remembered token is
  accepted only while its kid is still in the current key set, and still goes through the
  time checks on every call.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Mapping

import attrs

from trace_core.errors import SignerError, Unauthenticated
from trace_core.jws import (
    assemble,
    header_for,
    parse,
    signing_input,
    split,
    token_digest,
    verify_signature,
)
from trace_core.ports import PublicKey, Signer
from trace_core.token import CapabilityClaims, TokenPolicy, check_claims

#: A signer that answers with another key this many times in a row is refused.
_MAX_KEY_CHANGES = 3
#: How old (monotonic seconds) the verifier's key set may get before ``verify`` re-reads it.
KEY_REFRESH_S = 1.0
#: How long the last key set stays usable while the signer cannot be read.
KEY_MAX_STALE_S = 30.0


@attrs.frozen
class SignedToken:
    """A token this process signed, with what the verifier remembers it by."""

    #: The compact JWS.
    token: str
    #: The key it was signed with.
    kid: str
    #: ``jws.token_digest`` of what was signed: the token's ``ParsedJws.digest``.
    digest: bytes


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
    signed, _ = await _encode(claims, signer, key_hint)
    return signed.token


async def _encode(
    claims: CapabilityClaims, signer: Signer, key_hint: tuple[str, str] | None
) -> tuple[SignedToken, tuple[str, str]]:
    if key_hint is None:
        kid, alg, _ = await signer.sign(b"trace-jws-key-probe")
        key_hint = (kid, alg)
    payload = claims.to_payload()
    for _ in range(_MAX_KEY_CHANGES):
        kid, alg = key_hint
        signed = signing_input(header_for(kid, alg, claims.typ), payload)
        signed_kid, signed_alg, signature = await signer.sign(signed)
        if (signed_kid, signed_alg) == key_hint:
            token = assemble(signed, signature)
            return SignedToken(token, signed_kid, token_digest(signed, signature)), key_hint
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
        return (await self.sign(claims)).token

    async def sign(self, claims: CapabilityClaims) -> SignedToken:
        """Encode and sign ``claims``. Returns the token with its kid and digest (for
        ``TokenVerifier.remember_signed``). Raises ``SignerError``."""
        signed, self._hint = await _encode(claims, self._signer, self._hint)
        return signed


class TokenVerifier:
    """Verifies capability tokens with public keys fetched from a ``Signer`` and kept fresh."""

    def __init__(
        self,
        signer: Signer,
        policy: TokenPolicy | None = None,
        *,
        refresh_interval_s: float = KEY_REFRESH_S,
        max_stale_s: float = KEY_MAX_STALE_S,
    ) -> None:
        self._signer = signer
        self.policy = policy or TokenPolicy()
        self._refresh_interval_s = refresh_interval_s
        self._max_stale_s = max_stale_s
        self._keys: dict[str, PublicKey] = {}
        self._fetched_at: float | None = None  # last successful fetch
        self._tried_at: float | None = None  # last attempt, successful or not
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
        """Record a token signed with one of the signer's keys, so verifying it skips the
        signature (the token is parsed for its digest and kid; ``remember_signed`` is not).
        Raises ``Unauthenticated`` for a malformed token."""
        parsed = parse(token)
        self._store(parsed.digest, parsed.kid, claims)

    def remember_signed(self, signed: SignedToken, claims: CapabilityClaims) -> None:
        """Record a token this process just signed (``TokenIssuer.sign``), so verifying it
        skips the signature."""
        self._store(signed.digest, signed.kid, claims)

    @property
    def keys(self) -> Mapping[str, PublicKey]:
        """The cached key set, by kid."""
        return dict(self._keys)

    async def refresh(self, monotonic: float) -> None:
        """Fetch the signer's public keys now. Raises ``SignerError`` if the signer fails."""
        async with self._lock:
            await self._refresh_locked(monotonic)

    async def _refresh_locked(self, monotonic: float) -> None:
        try:
            keys = await self._signer.public_keys()
        finally:
            self._tried_at = monotonic  # only once the attempt is over: see _current_keys
        self._keys = {k.kid: k for k in keys}
        self._fetched_at = monotonic
        self.refresh_count += 1

    def _due(self, monotonic: float) -> bool:
        return self._tried_at is None or monotonic - self._tried_at >= self._refresh_interval_s

    def _fresh_enough(self, monotonic: float) -> bool:
        return self._fetched_at is not None and monotonic - self._fetched_at <= self._max_stale_s

    async def _current_keys(self, monotonic: float) -> Mapping[str, PublicKey]:
        """The key set, re-read first when older than the refresh interval.

        While one caller re-reads, the others wait for it -- unless they hold a key set that is
        still fresh enough, which they use. Raises ``Unauthenticated`` when the signer has not
        been readable for ``max_stale_s``.
        """
        if self._due(monotonic) and not (self._lock.locked() and self._fresh_enough(monotonic)):
            async with self._lock:
                if self._due(monotonic):
                    try:
                        await self._refresh_locked(monotonic)
                    except SignerError:
                        pass  # judged below: the last key set may still be fresh enough
        if not self._fresh_enough(monotonic):
            raise Unauthenticated("capability token: keys unavailable")
        return self._keys

    async def verify(self, token: str, *, now_epoch: int, monotonic: float) -> CapabilityClaims:
        """Verify ``token`` at ``now_epoch`` against the current key set.

        Returns the claims. Raises ``Unauthenticated`` (see ``trace_core.jws.verify_token``),
        also when the token's key was retired past its grace or revoked since it was last
        verified, or when the key set could not be read for ``max_stale_s``.
        """
        digest = split(token).digest  # canonical spelling checked; JSON parsed only on a miss
        keys = await self._current_keys(monotonic)
        known = self._verified.get(digest)
        if known is not None:  # these exact bytes were verified (or signed) here before
            kid, claims = known
            if kid not in keys:
                del self._verified[digest]
                raise Unauthenticated("capability token: key no longer trusted")
            return check_claims(self.policy, claims.to_payload(), now_epoch)
        parsed = parse(token)
        kid = verify_signature(parsed, keys, self.policy.typ)
        claims = check_claims(self.policy, parsed.payload, now_epoch)
        self._store(digest, kid, claims)
        return claims


__all__ = [
    "KEY_MAX_STALE_S",
    "KEY_REFRESH_S",
    "SignedToken",
    "TokenIssuer",
    "TokenVerifier",
    "encode_token",
]
