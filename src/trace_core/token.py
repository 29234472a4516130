"""Capability tokens and signing-key rotation, as pure rules (no JWT library, no clock).

A *capability token* is a JWT the Dispatcher issues for one attempt of one task; the worker
wrapper and UDF runners present it in ``X-Trace-Task-Capability`` on ``/v1/task/*``. This module
decides what a token says (``issue_claims``), whether its claims are acceptable
(``check_claims``) and whether it is bound to the task/attempt being touched
(``check_binding``). Encoding and signature checks live in ``trace_core.jws``.

Theory of operation
-------------------

Claims rules (every one raises ``Unauthenticated`` when broken, never anything else):

* ``iss``, ``aud`` and ``typ`` equal the policy's values *exactly* (``aud`` must be a string,
  not a list), so a user JWT can never pass for a capability token and vice versa;
* ``sub``, ``org_id``, ``task_id``, ``jti`` are non-empty strings; ``attempt`` is an int >= 1;
  ``iat`` and ``exp`` are ints (``bool`` is never an int here); ``grants``, if present, is an
  object with string keys;
* ``0 < exp - iat <= max_ttl_s``;
* ``now < exp + leeway_s`` (not expired) and ``iat <= now + leeway_s`` (not issued in the
  future); an ``nbf`` claim, if present, must be an int with ``nbf <= now + leeway_s``.

The TTL issued is ``attempt timeout + 60 s`` capped at ``max_ttl_s`` (16 min); the token is
renewed on heartbeat.

Key rotation is a table-driven state machine over key entries::

    (generated) ──publish──▶ next ──rotate──▶ current ──rotate──▶ retired ──grace over──▶ (gone)

* exactly one ``current`` key signs; at most one ``next`` key is published, not yet signing;
* ``rotate`` promotes ``next`` only once it has been published for at least
  ``min_publish_s`` (10 min), so every verifier has fetched it before the first token it signs
  arrives (``Conflict`` otherwise);
* a retired key still verifies for ``grace_s`` = max TTL + leeway after retirement, the longest
  any token it signed can stay valid. Nothing is rejected mid-rotation.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from typing import Any, Final

import attrs

from trace_core.errors import (
    Conflict,
    Forbidden,
    NotFound,
    SignerError,
    Unauthenticated,
    ValidationFailed,
)

#: Extra time a token lives beyond its attempt's timeout.
TTL_MARGIN_S: Final = 60
#: How long a ``next`` key must be published before it may sign.
MIN_PUBLISH_S: Final = 600


@attrs.frozen
class TokenPolicy:
    """What a capability token must say and how long it may live."""

    #: Required ``iss``.
    issuer: str = "trace-dispatcher"
    #: Required ``aud`` (a user JWT carries another audience).
    audience: str = "trace-task"
    #: Required ``typ``, in the JWS header and in the claims.
    typ: str = "trace-task+jwt"
    #: Clock skew tolerated on ``exp``, ``iat`` and ``nbf``.
    leeway_s: int = 10
    #: Longest lifetime (``exp - iat``) accepted or issued: 16 minutes.
    max_ttl_s: int = 960

    @property
    def key_grace_s(self) -> int:
        """How long a retired key must keep verifying: max TTL + leeway."""
        return self.max_ttl_s + self.leeway_s


@attrs.frozen
class CapabilityClaims:
    """The claims of one capability token: what one attempt of one task may do."""

    #: Issuer (the Dispatcher).
    iss: str
    #: Audience (task surfaces).
    aud: str
    #: Subject: ``task/{task_id}/attempt/{attempt}``.
    sub: str
    #: Token type, also in the JWS header.
    typ: str
    #: Organisation that owns the task.
    org_id: str
    #: Task the token is bound to.
    task_id: str
    #: Attempt number the token is bound to (>= 1).
    attempt: int
    #: Issued at, epoch seconds.
    iat: int
    #: Expires at, epoch seconds.
    exp: int
    #: Unique token id.
    jti: str
    #: Extra scoped grants (for example object-key prefixes); empty by default.
    grants: dict[str, Any] = attrs.field(factory=dict)

    def to_payload(self) -> dict[str, Any]:
        """The claims as a JWT payload mapping (``grants`` omitted when empty)."""
        payload: dict[str, Any] = {
            "iss": self.iss,
            "aud": self.aud,
            "sub": self.sub,
            "typ": self.typ,
            "org_id": self.org_id,
            "task_id": self.task_id,
            "attempt": self.attempt,
            "iat": self.iat,
            "exp": self.exp,
            "jti": self.jti,
        }
        if self.grants:
            payload["grants"] = dict(self.grants)
        return payload


def subject_for(task_id: str, attempt: int) -> str:
    """The ``sub`` claim for an attempt: ``task/{task_id}/attempt/{attempt}``."""
    return f"task/{task_id}/attempt/{attempt}"


def issue_claims(
    policy: TokenPolicy,
    *,
    org_id: str,
    task_id: str,
    attempt: int,
    attempt_timeout_s: int,
    now_epoch: int,
    jti: str,
    grants: Mapping[str, Any] | None = None,
) -> CapabilityClaims:
    """Claims for a new token for one attempt, valid from ``now_epoch``.

    TTL = ``attempt_timeout_s`` + 60 s, capped at ``policy.max_ttl_s``.
    Returns the claims. Raises ``ValidationFailed`` for an empty id, an attempt < 1 or a
    non-positive timeout.
    """
    for name, value in (("org_id", org_id), ("task_id", task_id), ("jti", jti)):
        if not isinstance(value, str) or not value:
            raise ValidationFailed(f"{name} must be a non-empty string", field=name)
    if not _is_int(attempt) or attempt < 1:
        raise ValidationFailed("attempt must be an integer >= 1", field="attempt")
    if not _is_int(attempt_timeout_s) or attempt_timeout_s <= 0:
        raise ValidationFailed(
            "attempt timeout must be a positive integer", field="attempt_timeout_s"
        )
    ttl = min(attempt_timeout_s + TTL_MARGIN_S, policy.max_ttl_s)
    return CapabilityClaims(
        iss=policy.issuer,
        aud=policy.audience,
        sub=subject_for(task_id, attempt),
        typ=policy.typ,
        org_id=org_id,
        task_id=task_id,
        attempt=attempt,
        iat=now_epoch,
        exp=now_epoch + ttl,
        jti=jti,
        grants=dict(grants or {}),
    )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _require_str(raw: Mapping[str, Any], name: str) -> str:
    value = raw.get(name)
    if not isinstance(value, str) or not value:
        raise Unauthenticated(f"capability token: claim {name!r} missing or not a string")
    return value


def _require_int(raw: Mapping[str, Any], name: str) -> int:
    value = raw.get(name)
    if not _is_int(value):
        raise Unauthenticated(f"capability token: claim {name!r} missing or not an integer")
    assert isinstance(value, int)
    return value


def check_claims(policy: TokenPolicy, raw: Mapping[str, Any], now_epoch: int) -> CapabilityClaims:
    """Check a decoded (signature-verified) payload against ``policy`` at ``now_epoch``.

    Returns the typed claims. Raises ``Unauthenticated`` for a missing or ill-typed claim, a
    wrong ``iss``/``aud``/``typ``, an expired or not-yet-valid token, or a TTL over the max.
    """
    if not isinstance(raw, Mapping):
        raise Unauthenticated("capability token: payload is not an object")
    exp = _require_int(raw, "exp")
    iat = _require_int(raw, "iat")
    iss = _require_str(raw, "iss")
    aud = _require_str(raw, "aud")
    sub = _require_str(raw, "sub")
    org_id = _require_str(raw, "org_id")
    task_id = _require_str(raw, "task_id")
    attempt = _require_int(raw, "attempt")
    jti = _require_str(raw, "jti")
    typ = raw.get("typ")
    grants = raw.get("grants", {})

    if iss != policy.issuer:
        raise Unauthenticated("capability token: wrong issuer")
    if aud != policy.audience:
        raise Unauthenticated("capability token: wrong audience")
    if typ != policy.typ:
        raise Unauthenticated("capability token: wrong type")
    if attempt < 1:
        raise Unauthenticated("capability token: attempt must be >= 1")
    if not isinstance(grants, Mapping) or not all(isinstance(k, str) for k in grants):
        raise Unauthenticated("capability token: grants must be an object")
    ttl = exp - iat
    if ttl <= 0:
        raise Unauthenticated("capability token: expires before it was issued")
    if ttl > policy.max_ttl_s:
        raise Unauthenticated("capability token: lifetime exceeds the maximum")
    if now_epoch >= exp + policy.leeway_s:
        raise Unauthenticated("capability token: expired")
    if iat > now_epoch + policy.leeway_s:
        raise Unauthenticated("capability token: issued in the future")
    if "nbf" in raw:
        nbf = _require_int(raw, "nbf")
        if nbf > now_epoch + policy.leeway_s:
            raise Unauthenticated("capability token: not valid yet")
    return CapabilityClaims(
        iss=iss,
        aud=aud,
        sub=sub,
        typ=typ,
        org_id=org_id,
        task_id=task_id,
        attempt=attempt,
        iat=iat,
        exp=exp,
        jti=jti,
        grants=dict(grants),
    )


def check_binding(claims: CapabilityClaims, task_id: str, attempt: int) -> None:
    """Check that the token was issued for exactly this task and attempt.

    Returns None. Raises ``Forbidden`` when it names another task or another attempt (a stale
    attempt's token never touches a newer attempt).
    """
    if claims.task_id != task_id:
        raise Forbidden("capability token is for another task")
    if claims.attempt != attempt:
        raise Forbidden("capability token is for another attempt")


# --------------------------------------------------------------------------------------------
# Key rotation


class KeyState(enum.StrEnum):
    """A signing key's state."""

    NEXT = "next"  # published for verifiers, not yet signing
    CURRENT = "current"  # signs new tokens
    RETIRED = "retired"  # no longer signs; verifies until its grace ends


#: What ``rotate`` does to each state: the whole transition table.
ROTATION: Final[Mapping[KeyState, KeyState]] = {
    KeyState.NEXT: KeyState.CURRENT,
    KeyState.CURRENT: KeyState.RETIRED,
    KeyState.RETIRED: KeyState.RETIRED,
}


@attrs.frozen
class KeyEntry:
    """One signing key's place in the rotation schedule (times are epoch seconds)."""

    #: Key id (the JWS ``kid``).
    kid: str
    #: The key's state.
    state: KeyState
    #: When the key was first published (as ``next``, or as ``current`` at bootstrap).
    published_at: float
    #: When it started signing; None while ``next``.
    activated_at: float | None = None
    #: When it stopped signing; None unless ``retired``.
    retired_at: float | None = None


def _to_entries(value: Iterable[KeyEntry]) -> tuple[KeyEntry, ...]:
    return tuple(value)


def _to_kids(value: Iterable[str]) -> frozenset[str]:
    return frozenset(value)


def _check_entries(_inst: object, _attr: object, entries: tuple[KeyEntry, ...]) -> None:
    kids = [e.kid for e in entries]
    if len(set(kids)) != len(kids):
        raise ValidationFailed("key ring: duplicate kid", field="kid")
    states = [e.state for e in entries]
    if states.count(KeyState.CURRENT) != 1:
        raise ValidationFailed("key ring: exactly one current key is required", field="state")
    if states.count(KeyState.NEXT) > 1:
        raise ValidationFailed("key ring: at most one next key is allowed", field="state")
    for e in entries:
        if e.state is KeyState.RETIRED and e.retired_at is None:
            raise ValidationFailed("key ring: a retired key needs retired_at", field="retired_at")


@attrs.frozen
class KeyRing:
    """The rotation state of a signer's keys; every method is pure and takes ``now``."""

    #: The keys; exactly one current, at most one next, any number retired.
    entries: tuple[KeyEntry, ...] = attrs.field(converter=_to_entries, validator=_check_entries)
    #: How long ``next`` must be published before ``rotate`` may promote it.
    min_publish_s: float = MIN_PUBLISH_S
    #: How long a retired key keeps verifying (max TTL + leeway).
    grace_s: float = TokenPolicy().key_grace_s
    #: Kids that never verify again, whatever their entry says (``revoke``).
    revoked: frozenset[str] = attrs.field(default=frozenset(), converter=_to_kids)

    @classmethod
    def bootstrap(
        cls,
        now: float,
        current_kid: str,
        next_kid: str | None = None,
        *,
        min_publish_s: float = MIN_PUBLISH_S,
        grace_s: float = TokenPolicy().key_grace_s,
    ) -> KeyRing:
        """A fresh ring: ``current_kid`` signing from ``now``, ``next_kid`` published at ``now``.

        Raises ``ValidationFailed`` if the two kids are equal.
        """
        entries = [KeyEntry(current_kid, KeyState.CURRENT, now, activated_at=now)]
        if next_kid is not None:
            entries.append(KeyEntry(next_kid, KeyState.NEXT, now))
        return cls(entries, min_publish_s=min_publish_s, grace_s=grace_s)

    def _one(self, state: KeyState) -> KeyEntry | None:
        return next((e for e in self.entries if e.state is state), None)

    @property
    def current(self) -> KeyEntry:
        """The current (signing) key entry."""
        entry = self._one(KeyState.CURRENT)
        if entry is None:  # pragma: no cover - the validator guarantees one
            raise SignerError("no current signing key")
        return entry

    @property
    def next(self) -> KeyEntry | None:
        """The published next key entry, if any."""
        return self._one(KeyState.NEXT)

    def signing_kid(self, now: float) -> str:
        """The kid that signs at ``now`` (the current key).

        Raises ``SignerError`` if the current key is revoked (a revocation interrupted before
        its rotation: never sign with a key nobody may trust).
        """
        del now  # signing never depends on time: promotion happens only in ``rotate``
        kid = self.current.kid
        if kid in self.revoked:
            raise SignerError("the current signing key is revoked; rotate")
        return kid

    def in_grace(self, entry: KeyEntry, now: float) -> bool:
        """Whether ``entry`` still verifies at ``now``: unless revoked, or retired beyond grace."""
        if entry.kid in self.revoked:
            return False
        if entry.state is not KeyState.RETIRED:
            return True
        assert entry.retired_at is not None
        return now <= entry.retired_at + self.grace_s

    def verifying_kids(self, now: float) -> list[str]:
        """Kids that verify at ``now``: current, next, and retired ones within their grace.

        Returns kids ordered current, next, then retired newest first.
        """
        order = {KeyState.CURRENT: 0, KeyState.NEXT: 1, KeyState.RETIRED: 2}
        live = [e for e in self.entries if self.in_grace(e, now)]
        live.sort(key=lambda e: (order[e.state], -(e.retired_at or 0.0)))
        return [e.kid for e in live]

    def can_rotate(self, now: float) -> bool:
        """Whether ``rotate(now, ...)`` would be allowed without ``force``."""
        nxt = self.next
        return nxt is not None and now - nxt.published_at >= self.min_publish_s

    def rotate(self, now: float, new_kid: str | None, *, force: bool = False) -> KeyRing:
        """Promote next → current, retire current, publish ``new_kid`` as the new next.

        Retired keys past their grace are dropped. ``force`` skips the publish-age check (for
        emergencies, such as a leaked current key). ``new_kid`` may be None to publish no next.
        Returns the new ring. Raises ``Conflict`` if there is no next key or it was published
        less than ``min_publish_s`` ago (unless ``force``), ``ValidationFailed`` if ``new_kid``
        is already in the ring.
        """
        nxt = self.next
        if nxt is None:
            raise Conflict("key rotation: no next key is published")
        if not force and now - nxt.published_at < self.min_publish_s:
            raise Conflict(
                "key rotation: the next key was published too recently; verifiers may not "
                f"have it yet (wait until {nxt.published_at + self.min_publish_s:.0f})"
            )
        if new_kid is not None and any(e.kid == new_kid for e in self.entries):
            raise ValidationFailed("key rotation: new kid is already in the ring", field="kid")
        entries: list[KeyEntry] = []
        for e in self.entries:
            target = ROTATION[e.state]
            if e.state is KeyState.RETIRED:
                if self.in_grace(e, now):
                    entries.append(e)
            elif target is KeyState.CURRENT:
                entries.append(attrs.evolve(e, state=target, activated_at=now))
            else:
                entries.append(attrs.evolve(e, state=target, retired_at=now))
        if new_kid is not None:
            entries.append(KeyEntry(new_kid, KeyState.NEXT, now))
        return attrs.evolve(self, entries=tuple(entries))

    def revoke(self, now: float, kid: str, new_kid: str | None) -> KeyRing:
        """Stop trusting ``kid`` at once (a leaked key), whatever its state.

        A current key is first rotated out with ``force`` (the published next key signs from
        ``now``, ``new_kid`` becomes the next); a next key is replaced by ``new_kid``; a retired
        key is dropped. The kid is recorded in ``revoked`` so no copy of it verifies again.
        Returns the new ring. Raises ``NotFound`` if ``kid`` is not in the ring, ``Conflict``
        when revoking the current key with no next key to promote, ``ValidationFailed`` if
        ``new_kid`` is already in the ring.
        """
        entry = next((e for e in self.entries if e.kid == kid), None)
        if entry is None:
            raise NotFound(f"key {kid!r} is not in the key ring")
        if new_kid is not None and any(e.kid == new_kid for e in self.entries):
            raise ValidationFailed("key revocation: new kid is already in the ring", field="kid")
        ring = self.rotate(now, new_kid, force=True) if entry.state is KeyState.CURRENT else self
        kept = [e for e in ring.entries if e.kid != kid]
        if entry.state is KeyState.NEXT and new_kid is not None:
            kept.append(KeyEntry(new_kid, KeyState.NEXT, now))
        return attrs.evolve(ring, entries=tuple(kept), revoked=ring.revoked | {kid})

    def publish_next(self, now: float, new_kid: str) -> KeyRing:
        """Publish ``new_kid`` as next when none is published.

        Returns the new ring. Raises ``Conflict`` if a next key already exists,
        ``ValidationFailed`` if the kid is already in the ring.
        """
        if self.next is not None:
            raise Conflict("key rotation: a next key is already published")
        if any(e.kid == new_kid for e in self.entries):
            raise ValidationFailed("key rotation: new kid is already in the ring", field="kid")
        return attrs.evolve(self, entries=(*self.entries, KeyEntry(new_kid, KeyState.NEXT, now)))


__all__ = [
    "MIN_PUBLISH_S",
    "ROTATION",
    "TTL_MARGIN_S",
    "CapabilityClaims",
    "KeyEntry",
    "KeyRing",
    "KeyState",
    "TokenPolicy",
    "check_binding",
    "check_claims",
    "issue_claims",
    "subject_for",
]
