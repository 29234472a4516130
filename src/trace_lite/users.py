"""End-user authentication: user JWTs from a configurable issuer, and Lite's local issuer.

A user JWT names a person (``sub``); it never carries org membership or roles -- those live in
Postgres (``org_members``, ``dag_members``). Verification rules (BRIEF §5):

* keys are configured with their algorithm pinned (``EdDSA`` or ``ES256``); the
  token's ``alg`` must equal the pinned one of the key its ``kid`` names, and PyJWT is called
  with exactly that algorithm and a loaded key object;
* ``exp, iat, iss, aud, sub`` are required; ``iss`` and ``aud`` are compared exactly; the
  header and claim ``typ`` must be ``trace-user+jwt`` and ``aud`` differs from the capability
  token's (``trace-task``), so neither ever passes for the other;
* leeway 30 s (external identity providers' clocks).

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
from typing import Any

import attrs
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from trace_core import errors
from trace_core.jws import kid_for, load_public_key

#: Algorithms a user-token key may be pinned to.
USER_ALGORITHMS = frozenset({"EdDSA", "ES256"})
_REQUIRED = ["exp", "iat", "iss", "aud", "sub"]


@attrs.frozen
class UserTokenPolicy:
    issuer: str = "trace-lite"
    audience: str = "trace-api"
    typ: str = "trace-user+jwt"
    leeway_s: int = 30
    #: Longest lifetime accepted (``exp - iat``).
    max_ttl_s: int = 24 * 3600


@attrs.frozen
class UserKey:
    kid: str
    algorithm: str
    public_pem: bytes


@attrs.frozen
class UserIdentity:
    subject: str
    issuer: str


def verify_user_token(
    token: str, keys: Mapping[str, UserKey], policy: UserTokenPolicy, now_epoch: int
) -> UserIdentity:
    """Verify a user JWT. Returns the identity. Raises ``Unauthenticated`` for anything wrong
    (malformed, unknown kid, algorithm not the key's, bad signature, wrong typ/iss/aud,
    expired, lifetime over the max)."""
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError as exc:
        raise errors.Unauthenticated("user token: malformed") from exc
    key = keys.get(str(header.get("kid", "")))
    if key is None:
        raise errors.Unauthenticated("user token: unknown key id")
    if header.get("alg") != key.algorithm:
        raise errors.Unauthenticated("user token: algorithm does not match the key")
    if header.get("typ") != policy.typ:
        raise errors.Unauthenticated("user token: wrong type")
    try:
        claims = jwt.decode(
            token,
            key=load_public_key(key.public_pem, key.algorithm),
            algorithms=[key.algorithm],
            audience=policy.audience,
            issuer=policy.issuer,
            leeway=policy.leeway_s,
            options={
                "require": _REQUIRED,
                "verify_signature": True,
                "verify_exp": False,
                "verify_iat": False,
                "verify_nbf": False,
            },
        )
    except (jwt.PyJWTError, ValueError, TypeError) as exc:
        raise errors.Unauthenticated("user token: does not verify") from exc
    exp, iat, sub = claims.get("exp"), claims.get("iat"), claims.get("sub")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (exp, iat)):
        raise errors.Unauthenticated("user token: exp/iat must be integers")
    assert isinstance(exp, int) and isinstance(iat, int)
    if claims.get("aud") != policy.audience or claims.get("typ") != policy.typ:
        raise errors.Unauthenticated("user token: wrong audience or type")
    if not isinstance(sub, str) or not sub:
        raise errors.Unauthenticated("user token: sub missing")
    if not 0 < exp - iat <= policy.max_ttl_s:
        raise errors.Unauthenticated("user token: lifetime out of range")
    if now_epoch >= exp + policy.leeway_s:
        raise errors.Unauthenticated("user token: expired")
    if iat > now_epoch + policy.leeway_s:
        raise errors.Unauthenticated("user token: issued in the future")
    return UserIdentity(subject=sub, issuer=str(claims["iss"]))


class UserAuthenticator:
    """Verifies ``Authorization: Bearer <user JWT>`` with a fixed, configured key set."""

    def __init__(
        self,
        keys: Mapping[str, UserKey],
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
        policy = UserTokenPolicy(
            issuer=e.get("TRACE_USER_JWT_ISSUER") or UserTokenPolicy.issuer,
            audience=e.get("TRACE_USER_JWT_AUDIENCE") or UserTokenPolicy.audience,
        )
        path = e.get("TRACE_USER_JWT_KEYS")
        if path:
            entries = json.loads(Path(path).read_text())
            keys = {}
            for k in entries:
                if k["alg"] not in USER_ALGORITHMS:
                    raise errors.ValidationFailed(f"unsupported user-token algorithm {k['alg']}")
                keys[k["kid"]] = UserKey(k["kid"], k["alg"], k["pem"].encode())
            return cls(keys, policy)
        issuer = LocalUserIssuer.init(key_dir)
        return cls({issuer.key.kid: issuer.key}, policy)


class LocalUserIssuer:
    """Lite's development issuer: an Ed25519 key under ``key_dir`` that signs user tokens."""

    def __init__(
        self, private_key: ed25519.Ed25519PrivateKey, policy: UserTokenPolicy = UserTokenPolicy()
    ) -> None:
        self._private = private_key
        self.policy = policy
        public = private_key.public_key()
        pem = public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.key = UserKey(kid="user-" + kid_for(public), algorithm="EdDSA", public_pem=pem)

    @classmethod
    def init(cls, key_dir: Path) -> LocalUserIssuer:
        """Load the key from ``key_dir/users/issuer.pem``, creating it (mode 0600) if missing."""
        path = Path(key_dir) / "users" / "issuer.pem"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            pem = ed25519.Ed25519PrivateKey.generate().private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(pem)
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise errors.SignerError("the local user issuer key must be Ed25519")
        return cls(key)

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
        return jwt.encode(
            claims,
            self._private,
            algorithm="EdDSA",
            headers={"kid": self.key.kid, "typ": self.policy.typ},
        )


__all__ = [
    "LocalUserIssuer",
    "UserAuthenticator",
    "UserIdentity",
    "UserKey",
    "UserTokenPolicy",
    "verify_user_token",
]
