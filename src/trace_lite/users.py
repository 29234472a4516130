"""End-user authentication: user JWTs from a configurable issuer, and Lite's local issuer.

A user JWT names a person (``sub``); it never carries org membership or roles -- those live in
Postgres (``org_members``, ``dag_members``). Verification goes through the same pure code as
capability tokens (``trace_core.jws.parse`` and ``verify_signature``):

* only canonical base64url, and JSON objects without duplicate member names;
* keys are configured with their algorithm pinned (``EdDSA`` or ``ES256``); the token's ``alg``
  must equal the pinned one of the key its ``kid`` names; the header carries only ``alg``,
  ``kid`` and ``typ``;
* ``exp, iat, iss, aud, sub`` are required; ``iss`` and ``aud`` are compared exactly; the
  header and claim ``typ`` must be ``trace-user+jwt`` and ``aud`` differs from the capability
  token's (``trace-task``), so neither ever passes for the other;
* leeway 30 s (external identity providers' clocks); lifetime at most 24 h.

Configuration (environment): ``TRACE_USER_JWT_ISSUER``, ``TRACE_USER_JWT_AUDIENCE`` and
``TRACE_USER_JWT_KEYS`` (a JSON file: ``[{"kid", "alg", "pem"}]``). Unset in Lite, the local
issuer's key under ``.trace/keys/users/`` is trusted; ``trace users token --sub alice`` mints a
development token with it.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import attrs
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from trace_core import errors
from trace_core.jws import (
    SUPPORTED_ALGORITHMS,
    assemble,
    header_for,
    parse,
    public_key_for,
    sign_jws,
    signing_input,
    verify_signature,
)
from trace_core.ports import PublicKey
from trace_lite.secret_files import read_or_create

#: Algorithms a user-token key may be pinned to.
USER_ALGORITHMS: Final = SUPPORTED_ALGORITHMS
#: A user-token verification key: kid, pinned algorithm, SPKI PEM (the Signer port's record).
UserKey = PublicKey
_LABEL: Final = "user token"


@attrs.frozen
class UserTokenPolicy:
    """What a user JWT must say and how long it may live."""

    #: Required ``iss``.
    issuer: str = "trace-lite"
    #: Required ``aud``.
    audience: str = "trace-api"
    #: Required ``typ``, in the JWS header and in the claims.
    typ: str = "trace-user+jwt"
    #: Clock skew tolerated on ``exp`` and ``iat``.
    leeway_s: int = 30
    #: Longest lifetime accepted (``exp - iat``).
    max_ttl_s: int = 24 * 3600

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> UserTokenPolicy:
        """The policy with ``TRACE_USER_JWT_ISSUER`` / ``TRACE_USER_JWT_AUDIENCE`` over the
        defaults (unset or empty: the default, Lite's local issuer ``trace-lite`` and the
        audience ``trace-api``)."""
        e = os.environ if env is None else env
        default = cls()
        return cls(
            issuer=e.get("TRACE_USER_JWT_ISSUER") or default.issuer,
            audience=e.get("TRACE_USER_JWT_AUDIENCE") or default.audience,
        )


@attrs.frozen
class UserIdentity:
    """Who a verified user token names."""

    #: The ``sub`` claim.
    subject: str
    #: The ``iss`` claim.
    issuer: str


def _int_claim(claims: Mapping[str, Any], name: str) -> int:
    value = claims.get(name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise errors.Unauthenticated(f"{_LABEL}: {name} must be an integer")
    return value


def verify_user_token(
    token: str, keys: Mapping[str, PublicKey], policy: UserTokenPolicy, now_epoch: int
) -> UserIdentity:
    """Verify a user JWT at ``now_epoch``. Returns the identity.

    Raises ``Unauthenticated`` for anything wrong: malformed or non-canonical, unknown kid,
    algorithm not the key's, unexpected header parameter, bad signature, wrong
    ``typ``/``iss``/``aud``, missing ``sub``, expired, issued in the future, lifetime over the
    max.
    """
    parsed = parse(token, label=_LABEL)
    verify_signature(parsed, keys, policy.typ)
    claims = parsed.payload
    exp, iat = _int_claim(claims, "exp"), _int_claim(claims, "iat")
    iss, sub = claims.get("iss"), claims.get("sub")
    if iss != policy.issuer:
        raise errors.Unauthenticated(f"{_LABEL}: wrong issuer")
    if claims.get("aud") != policy.audience or claims.get("typ") != policy.typ:
        raise errors.Unauthenticated(f"{_LABEL}: wrong audience or type")
    if not isinstance(sub, str) or not sub:
        raise errors.Unauthenticated(f"{_LABEL}: sub missing")
    if not 0 < exp - iat <= policy.max_ttl_s:
        raise errors.Unauthenticated(f"{_LABEL}: lifetime out of range")
    if now_epoch >= exp + policy.leeway_s:
        raise errors.Unauthenticated(f"{_LABEL}: expired")
    if iat > now_epoch + policy.leeway_s:
        raise errors.Unauthenticated(f"{_LABEL}: issued in the future")
    if "nbf" in claims and _int_claim(claims, "nbf") > now_epoch + policy.leeway_s:
        raise errors.Unauthenticated(f"{_LABEL}: not valid yet")
    return UserIdentity(subject=sub, issuer=iss)


class UserAuthenticator:
    """Verifies ``Authorization: Bearer <user JWT>`` with a fixed, configured key set."""

    def __init__(
        self,
        keys: Mapping[str, PublicKey],
        policy: UserTokenPolicy = UserTokenPolicy(),
    ) -> None:
        self.keys = dict(keys)
        self.policy = policy

    def authenticate(self, authorization: str | None) -> UserIdentity:
        """Raises ``Unauthenticated`` without a valid bearer user token."""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise errors.Unauthenticated("a user bearer token is required")
        return verify_user_token(token.strip(), self.keys, self.policy, int(time.time()))

    @classmethod
    def from_env(cls, key_dir: Path, env: Mapping[str, str] | None = None) -> UserAuthenticator:
        """Configured keys (``TRACE_USER_JWT_*``), or the local issuer's key in Lite."""
        e = os.environ if env is None else env
        policy = UserTokenPolicy.from_env(e)
        path = e.get("TRACE_USER_JWT_KEYS")
        if path:
            entries = json.loads(Path(path).read_text())
            keys = {}
            for k in entries:
                if k["alg"] not in USER_ALGORITHMS:
                    raise errors.ValidationFailed(f"unsupported user-token algorithm {k['alg']}")
                keys[k["kid"]] = UserKey(k["kid"], k["alg"], k["pem"].encode())
            return cls(keys, policy)
        issuer = LocalUserIssuer.init(key_dir, policy=policy)
        return cls({issuer.key.kid: issuer.key}, policy)


def _new_private_pem() -> bytes:
    return ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


class LocalUserIssuer:
    """Lite's development issuer: an Ed25519 key under ``key_dir`` that signs user tokens."""

    def __init__(
        self, private_key: ed25519.Ed25519PrivateKey, policy: UserTokenPolicy = UserTokenPolicy()
    ) -> None:
        self._private = private_key
        self.policy = policy
        public = public_key_for(private_key)
        #: The verification key for this issuer's tokens (its kid prefixed with ``user-``).
        self.key = attrs.evolve(public, kid="user-" + public.kid)

    @classmethod
    def init(cls, key_dir: Path, *, policy: UserTokenPolicy | None = None) -> LocalUserIssuer:
        """Load the key from ``key_dir/users/issuer.pem``, creating it (mode 0600, directory
        0700) if missing; processes starting together on a fresh directory agree on one key.

        ``policy`` defaults to ``UserTokenPolicy.from_env()``: the one the Dispatcher's
        ``UserAuthenticator.from_env`` verifies with, so minted tokens are accepted.
        """
        path = Path(key_dir) / "users" / "issuer.pem"
        pem = read_or_create(path, _new_private_pem)  # safe when processes start together
        key = serialization.load_pem_private_key(pem, password=None)
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise errors.SignerError("the local user issuer key must be Ed25519")
        return cls(key, policy if policy is not None else UserTokenPolicy.from_env())

    def token(
        self,
        subject: str,
        *,
        ttl_s: int = 3600,
        now_epoch: int | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> str:
        """A user JWT for ``subject`` (no roles: those live in Postgres)."""
        now = int(time.time()) if now_epoch is None else now_epoch
        claims = {
            "iss": self.policy.issuer,
            "aud": self.policy.audience,
            "sub": subject,
            "typ": self.policy.typ,
            "iat": now,
            "exp": now + ttl_s,
            "jti": uuid.uuid4().hex,
            **(extra or {}),
        }
        signed = signing_input(
            header_for(self.key.kid, self.key.algorithm, self.policy.typ), claims
        )
        return assemble(signed, sign_jws(self._private, signed))


__all__ = [
    "LocalUserIssuer",
    "UserAuthenticator",
    "UserIdentity",
    "UserKey",
    "UserTokenPolicy",
    "verify_user_token",
]
