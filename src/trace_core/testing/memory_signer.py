"""An in-memory ``Signer`` with real keys, rotation and fault hooks, for tests.

Keys are generated with ``cryptography`` (Ed25519 → ``EdDSA`` by default, or P-256 →
``ES256``). The rotation schedule is the kernel's ``KeyRing``, so the memory signer follows the
same rules as the real ones: a ``next`` key is published at creation, ``rotate()`` promotes it
(refusing one published less than 10 minutes ago unless ``force=True``), and retired keys keep
verifying for max TTL + leeway.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from trace_core.errors import SignerError, ValidationFailed
from trace_core.jws import PrivateKey, load_public_key, public_key_for, sign_jws, verify_jws
from trace_core.ports import PublicKey
from trace_core.token import MIN_PUBLISH_S, KeyRing, KeyState, TokenPolicy


def generate_private_key(algorithm: str) -> PrivateKey:
    """A new private key for ``EdDSA`` (Ed25519) or ``ES256`` (P-256).

    Raises ``ValidationFailed`` for another algorithm.
    """
    if algorithm == "EdDSA":
        return ed25519.Ed25519PrivateKey.generate()
    if algorithm == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    raise ValidationFailed(f"unsupported algorithm {algorithm!r}", field="algorithm")


class MemorySigner:
    """A ``Signer`` holding its keys in memory.

    ``clock`` returns epoch seconds (defaults to ``time.time``; pass a manual clock's to drive
    rotation grace deterministically).
    """

    def __init__(
        self,
        algorithm: str = "EdDSA",
        *,
        with_next: bool = True,
        clock: Callable[[], float] = time.time,
        min_publish_s: float = MIN_PUBLISH_S,
        grace_s: float = TokenPolicy().key_grace_s,
    ) -> None:
        self.algorithm = algorithm
        self._clock = clock
        self._private: dict[str, PrivateKey] = {}
        self._public: dict[str, PublicKey] = {}
        current = self._new_key()
        nxt = self._new_key() if with_next else None
        self.ring = KeyRing.bootstrap(
            clock(), current, nxt, min_publish_s=min_publish_s, grace_s=grace_s
        )
        self._fail_sign: list[BaseException] = []
        #: Every signing input signed, in order (fault-injected calls excluded).
        self.signed: list[bytes] = []

    def _new_key(self) -> str:
        private = generate_private_key(self.algorithm)
        public = public_key_for(private)
        self._private[public.kid] = private
        self._public[public.kid] = public
        return public.kid

    # -- fault hooks and controls -------------------------------------------------------------

    def fail_next_sign(self, exc: BaseException) -> None:
        """Make the next ``sign`` call raise ``exc`` (queued: call twice for two failures)."""
        self._fail_sign.append(exc)

    @property
    def current_kid(self) -> str:
        """The kid that signs now."""
        return self.ring.signing_kid(self._clock())

    @property
    def next_kid(self) -> str | None:
        """The published next kid, if any."""
        entry = self.ring.next
        return entry.kid if entry else None

    def rotate(self, *, force: bool = False, with_next: bool = True) -> str:
        """Promote next → current, retire current, publish a new next.

        Returns the new current kid. Raises ``Conflict`` if next was published less than
        ``min_publish_s`` ago (unless ``force``) or there is no next key.
        """
        now = self._clock()
        new_kid = self._new_key() if with_next else None
        try:
            self.ring = self.ring.rotate(now, new_kid, force=force)
        except Exception:
            if new_kid is not None:
                del self._private[new_kid], self._public[new_kid]
            raise
        live = {e.kid for e in self.ring.entries}
        for kid in list(self._private):
            if kid not in live:
                del self._private[kid], self._public[kid]
        return self.ring.signing_kid(now)

    def revoke(self, kid: str) -> str:
        """Stop trusting ``kid`` at once (``KeyRing.revoke``); a fresh next key replaces a
        revoked current or next one. Returns the current kid. Raises ``NotFound`` for a kid
        not in the ring."""
        now = self._clock()
        entry = next((e for e in self.ring.entries if e.kid == kid), None)
        replaces = entry is not None and entry.state is not KeyState.RETIRED
        new_kid = self._new_key() if replaces else None
        try:
            self.ring = self.ring.revoke(now, kid, new_kid)
        except Exception:
            if new_kid is not None:
                del self._private[new_kid], self._public[new_kid]
            raise
        self._private.pop(kid, None)
        self._public.pop(kid, None)
        return self.ring.current.kid

    # -- Signer -------------------------------------------------------------------------------

    async def sign(self, signing_input: bytes) -> tuple[str, str, bytes]:
        """Sign with the current key; returns ``(kid, algorithm, signature)``.

        Raises ``SignerError`` (or whatever ``fail_next_sign`` queued).
        """
        if self._fail_sign:
            raise self._fail_sign.pop(0)
        kid = self.ring.signing_kid(self._clock())
        private = self._private.get(kid)
        if private is None:  # pragma: no cover - the ring and the dict move together
            raise SignerError("current signing key is missing")
        self.signed.append(bytes(signing_input))
        return kid, self._public[kid].algorithm, sign_jws(private, signing_input)

    async def public_keys(self) -> list[PublicKey]:
        """Current, next and in-grace retired public keys (current first)."""
        return [self._public[kid] for kid in self.ring.verifying_kids(self._clock())]

    async def verify(self, kid: str, signing_input: bytes, signature: bytes) -> bool:
        """Whether ``signature`` verifies with key ``kid``; False for unknown kids or bad input."""
        if not isinstance(kid, str) or kid not in self.ring.verifying_kids(self._clock()):
            return False
        public = self._public[kid]
        try:
            key = load_public_key(public.public_pem, public.algorithm)
            return verify_jws(key, bytes(signing_input), bytes(signature))
        except Exception:
            return False


__all__ = ["MemorySigner", "generate_private_key"]
