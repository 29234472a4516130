"""``KmsSigner``: the Signer port on AWS KMS asymmetric keys (ECC_NIST_P256 → JWS ES256).

Theory of operation
-------------------

* A key is named by a KMS key id, ARN or alias. Its public key is fetched once with
  ``GetPublicKey`` and cached by KMS key ARN (a KMS key's key material never changes). Only
  ``ECC_NIST_P256`` keys with ``ECDSA_SHA_256`` are accepted, so every Trace kid is pinned to
  ``ES256``; the algorithm is never read from a token.
* The kid is ``trace_core.jws.kid_for`` of the public key (as for every other signer), so
  tokens carry no AWS identifiers; the signer keeps kid → KMS key ARN.
* ``sign`` calls KMS ``Sign`` (``MessageType=RAW`` up to 4 KiB, else ``DIGEST`` of the SHA-256)
  and converts KMS's DER signature to the raw ``r||s`` JWS form. ``verify`` is local, with the
  cached public key: verification never calls KMS.
* Rotation follows ``trace_core.token.KeyRing``: ``current`` signs, ``next`` is published.
  Operators rotate by re-pointing two aliases (``alias/trace-next`` → a fresh key,
  ``alias/trace-current`` → the old next) at least ``MIN_PUBLISH_S`` after the next key was
  published; every process re-resolves the aliases every ``alias_ttl_s`` and, when the
  current key changed, retires the old one locally (it keeps verifying for the grace period).
  ``rotate(new_next)`` does the same in-process (admin tools and tests).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from typing import Any

import attrs
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from trace_aws._boto import AwsCalls, client
from trace_core import errors
from trace_core.jws import kid_for, verify_jws
from trace_core.ports import PublicKey
from trace_core.token import KeyEntry, KeyRing, KeyState, TokenPolicy

KEY_SPEC = "ECC_NIST_P256"
SIGNING_ALGORITHM = "ECDSA_SHA_256"
JWS_ALGORITHM = "ES256"
_RAW_LIMIT = 4096
_P256_BYTES = 32


@attrs.frozen
class _Key:
    arn: str
    public: PublicKey
    verifying: ec.EllipticCurvePublicKey


class KmsSigner:
    """Signs with the KMS key ``current``; publishes ``current``, ``next`` and retired keys."""

    def __init__(
        self,
        current: str,
        next: str | None = None,
        *,
        kms: Any | None = None,
        endpoint_url: str | None = None,
        region_name: str | None = None,
        policy: TokenPolicy = TokenPolicy(),
        alias_ttl_s: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._kms = kms or client("kms", endpoint_url=endpoint_url, region_name=region_name)
        self._calls = AwsCalls(max_workers=8, name="trace-kms")
        self._refs = (current, next)
        self._clock = clock
        self._policy = policy
        self._alias_ttl_s = alias_ttl_s
        self._by_arn: dict[str, _Key] = {}
        self._by_kid: dict[str, _Key] = {}
        self._ring: KeyRing | None = None
        self._resolved_at = float("-inf")

    # -- keys -------------------------------------------------------------------------------

    async def _load(self, ref: str) -> _Key:
        resp = await self._calls.run("kms get public key", self._kms.get_public_key, KeyId=ref)
        arn = str(resp["KeyId"])
        cached = self._by_arn.get(arn)
        if cached is not None:
            return cached
        if resp.get("KeySpec", resp.get("CustomerMasterKeySpec")) != KEY_SPEC or (
            SIGNING_ALGORITHM not in resp.get("SigningAlgorithms", [])
        ):
            raise errors.SignerError(f"KMS key {ref} is not an {KEY_SPEC} signing key")
        public = serialization.load_der_public_key(resp["PublicKey"])
        if not isinstance(public, ec.EllipticCurvePublicKey) or not isinstance(
            public.curve, ec.SECP256R1
        ):
            raise errors.SignerError(f"KMS key {ref} did not return a P-256 public key")
        pem = public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        key = _Key(arn, PublicKey(kid_for(public), JWS_ALGORITHM, pem), public)
        self._by_arn[arn] = key
        self._by_kid[key.public.kid] = key
        return key

    async def _resolve(self) -> KeyRing:
        now = self._clock()
        if self._ring is not None and now - self._resolved_at < self._alias_ttl_s:
            return self._ring
        try:
            current = await self._load(self._refs[0])
            nxt = await self._load(self._refs[1]) if self._refs[1] else None
        except errors.SignerError:
            raise
        except errors.TraceError as exc:
            if self._ring is not None:
                return self._ring  # KMS unreachable: keep signing with what we know
            raise errors.SignerError(f"KMS keys unavailable: {exc.message}") from exc
        ring = self._ring
        cur_kid = current.public.kid
        next_kid = nxt.public.kid if nxt and nxt.public.kid != cur_kid else None
        if ring is None:
            ring = KeyRing.bootstrap(now, cur_kid, next_kid, grace_s=self._policy.key_grace_s)
        elif ring.current.kid != cur_kid:
            if ring.next is not None and ring.next.kid == cur_kid:
                ring = ring.rotate(now, next_kid, force=True)  # the aliases moved as planned
            else:  # an unplanned jump: retire the old current, adopt the new pair
                kept = [
                    e
                    if e.state is not KeyState.CURRENT
                    else attrs.evolve(e, state=KeyState.RETIRED, retired_at=now)
                    for e in ring.entries
                    if e.kid not in (cur_kid, next_kid) and e.state is not KeyState.NEXT
                ]
                kept.append(KeyEntry(cur_kid, KeyState.CURRENT, now, activated_at=now))
                if next_kid is not None:
                    kept.append(KeyEntry(next_kid, KeyState.NEXT, now))
                ring = KeyRing(kept, min_publish_s=ring.min_publish_s, grace_s=ring.grace_s)
        elif next_kid != (ring.next.kid if ring.next else None):
            kept = [e for e in ring.entries if e.state is not KeyState.NEXT and e.kid != next_kid]
            if next_kid is not None:
                kept.append(KeyEntry(next_kid, KeyState.NEXT, now))
            ring = KeyRing(kept, min_publish_s=ring.min_publish_s, grace_s=ring.grace_s)
        self._ring = ring
        self._resolved_at = now
        return ring

    async def rotate(self, new_next: str | None, *, force: bool = False) -> str:
        """Promote next → current and publish ``new_next`` (a KMS key id/ARN/alias) as next.

        Returns the new current kid. Raises ``Conflict`` if there is no next key or it was
        published less than 10 minutes ago (unless ``force``), ``SignerError``.
        """
        ring = await self._resolve()
        new = await self._load(new_next) if new_next else None
        self._ring = ring.rotate(self._clock(), new.public.kid if new else None, force=force)
        nxt_arn = self._by_kid[self._ring.current.kid].arn
        self._refs = (nxt_arn, new.arn if new else None)
        self._resolved_at = self._clock()
        return self._ring.current.kid

    # -- the port ---------------------------------------------------------------------------

    async def sign(self, signing_input: bytes) -> tuple[str, str, bytes]:
        """Sign with the current KMS key; returns ``(kid, "ES256", raw r||s)``.
        Raises ``SignerError``."""
        ring = await self._resolve()
        key = self._by_kid[ring.current.kid]
        if len(signing_input) <= _RAW_LIMIT:
            message, message_type = bytes(signing_input), "RAW"
        else:
            message, message_type = hashlib.sha256(signing_input).digest(), "DIGEST"
        try:
            resp = await self._calls.run(
                "kms sign",
                self._kms.sign,
                KeyId=key.arn,
                Message=message,
                MessageType=message_type,
                SigningAlgorithm=SIGNING_ALGORITHM,
            )
            r, s = decode_dss_signature(resp["Signature"])
        except errors.TraceError as exc:
            raise errors.SignerError(f"KMS sign failed: {exc.message}") from exc
        except (ValueError, KeyError) as exc:
            raise errors.SignerError("KMS returned an unreadable signature") from exc
        return (
            key.public.kid,
            JWS_ALGORITHM,
            (r.to_bytes(_P256_BYTES, "big") + s.to_bytes(_P256_BYTES, "big")),
        )

    async def public_keys(self) -> list[PublicKey]:
        """Current, next and retired-within-grace keys (cached; aliases re-resolved every
        ``alias_ttl_s``). Raises ``SignerError``."""
        ring = await self._resolve()
        return [self._by_kid[kid].public for kid in ring.verifying_kids(self._clock())]

    async def verify(self, kid: str, signing_input: bytes, signature: bytes) -> bool:
        """Local ES256 verification with a published key; False for anything wrong."""
        try:
            ring = await self._resolve()
        except errors.TraceError:
            return False
        if kid not in ring.verifying_kids(self._clock()):
            return False
        key = self._by_kid.get(kid)
        return key is not None and verify_jws(key.verifying, signing_input, signature)

    async def close(self) -> None:
        self._calls.close()


def create_signing_key(
    *,
    kms: Any | None = None,
    endpoint_url: str | None = None,
    region_name: str | None = None,
    alias: str | None = None,
    description: str = "Trace capability-token signing key",
) -> str:
    """Create an ECC_NIST_P256 SIGN_VERIFY key (blocking; setup scripts and tests).
    Returns its key id; points ``alias`` at it when given."""
    kms = kms or client("kms", endpoint_url=endpoint_url, region_name=region_name)
    key_id = str(
        kms.create_key(KeySpec=KEY_SPEC, KeyUsage="SIGN_VERIFY", Description=description)[
            "KeyMetadata"
        ]["KeyId"]
    )
    if alias:
        try:
            kms.create_alias(AliasName=alias, TargetKeyId=key_id)
        except Exception:
            kms.update_alias(AliasName=alias, TargetKeyId=key_id)
    return key_id


__all__ = ["JWS_ALGORITHM", "KEY_SPEC", "KmsSigner", "create_signing_key"]
