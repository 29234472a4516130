"""Capability-token claim rules and key rotation: every rule, legal and illegal."""

from __future__ import annotations

from typing import Any

import attrs
import pytest

from trace_core.errors import (
    Conflict,
    Forbidden,
    NotFound,
    SignerError,
    Unauthenticated,
    ValidationFailed,
)
from trace_core.token import (
    ROTATION,
    CapabilityClaims,
    KeyEntry,
    KeyRing,
    KeyState,
    TokenPolicy,
    check_binding,
    check_claims,
    issue_claims,
)

POLICY = TokenPolicy()
NOW = 1_800_000_000


def _claims(**overrides: Any) -> CapabilityClaims:
    claims = issue_claims(
        POLICY,
        org_id="org-1",
        task_id="task-1",
        attempt=2,
        attempt_timeout_s=60,
        now_epoch=NOW,
        jti="jti-1",
    )
    return attrs.evolve(claims, **overrides) if overrides else claims


def _payload(**overrides: Any) -> dict[str, Any]:
    payload = _claims().to_payload()
    for name, value in overrides.items():
        if value is _DROP:
            payload.pop(name, None)
        else:
            payload[name] = value
    return payload


_DROP = object()


# -- issue_claims -----------------------------------------------------------------------------


def test_policy_defaults_match_the_brief() -> None:
    assert POLICY.issuer == "trace-dispatcher"
    assert POLICY.audience == "trace-task"
    assert POLICY.typ == "trace-task+jwt"
    assert POLICY.leeway_s == 10
    assert POLICY.max_ttl_s == 960
    assert POLICY.key_grace_s == 970


def test_issue_claims_fills_every_claim() -> None:
    c = _claims()
    assert (c.iss, c.aud, c.typ) == (POLICY.issuer, POLICY.audience, POLICY.typ)
    assert (c.org_id, c.task_id, c.attempt, c.jti) == ("org-1", "task-1", 2, "jti-1")
    assert c.sub == "task/task-1/attempt/2"
    assert c.iat == NOW
    assert c.grants == {}


@pytest.mark.parametrize(
    ("timeout", "ttl"), [(1, 61), (60, 120), (899, 959), (900, 960), (901, 960), (10_000, 960)]
)
def test_ttl_is_timeout_plus_60_capped_at_16_minutes(timeout: int, ttl: int) -> None:
    c = issue_claims(
        POLICY,
        org_id="o",
        task_id="t",
        attempt=1,
        attempt_timeout_s=timeout,
        now_epoch=NOW,
        jti="j",
    )
    assert c.exp - c.iat == ttl


def test_issue_claims_carries_grants() -> None:
    c = issue_claims(
        POLICY,
        org_id="o",
        task_id="t",
        attempt=1,
        attempt_timeout_s=5,
        now_epoch=NOW,
        jti="j",
        grants={"prefix": "org/o/scratch/t/"},
    )
    assert c.grants == {"prefix": "org/o/scratch/t/"}
    assert c.to_payload()["grants"] == {"prefix": "org/o/scratch/t/"}
    assert "grants" not in _claims().to_payload()


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("org_id", {"org_id": ""}),
        ("task_id", {"task_id": ""}),
        ("jti", {"jti": ""}),
        ("attempt", {"attempt": 0}),
        ("attempt", {"attempt": True}),
        ("attempt_timeout_s", {"attempt_timeout_s": 0}),
        ("attempt_timeout_s", {"attempt_timeout_s": -5}),
    ],
)
def test_issue_claims_rejects_bad_input(field: str, kwargs: dict[str, Any]) -> None:
    base: dict[str, Any] = {
        "org_id": "o",
        "task_id": "t",
        "attempt": 1,
        "attempt_timeout_s": 60,
        "now_epoch": NOW,
        "jti": "j",
    }
    base.update(kwargs)
    with pytest.raises(ValidationFailed) as info:
        issue_claims(POLICY, **base)
    assert info.value.field == field


# -- check_claims -----------------------------------------------------------------------------


def test_issued_claims_roundtrip_through_check() -> None:
    assert check_claims(POLICY, _claims().to_payload(), NOW) == _claims()
    with_grants = _claims(grants={"a": 1})
    assert check_claims(POLICY, with_grants.to_payload(), NOW) == with_grants


@pytest.mark.parametrize(
    "name", ["exp", "iat", "iss", "aud", "sub", "org_id", "task_id", "attempt", "jti", "typ"]
)
def test_missing_required_claim_is_unauthenticated(name: str) -> None:
    with pytest.raises(Unauthenticated):
        check_claims(POLICY, _payload(**{name: _DROP}), NOW)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("exp", "1800000120"),
        ("exp", 1_800_000_120.5),
        ("exp", True),
        ("exp", None),
        ("iat", "x"),
        ("iat", float(NOW)),
        ("iat", False),
        ("iss", 1),
        ("iss", ""),
        ("aud", ["trace-task"]),  # a list audience never passes, even if it contains ours
        ("aud", None),
        ("sub", 5),
        ("sub", ""),
        ("org_id", 1),
        ("task_id", {"id": "task-1"}),
        ("attempt", "2"),
        ("attempt", 2.0),
        ("attempt", True),
        ("attempt", 0),
        ("attempt", -1),
        ("jti", 7),
        ("grants", ["a"]),
        ("grants", "a"),
        ("nbf", "soon"),
    ],
)
def test_ill_typed_claim_is_unauthenticated(name: str, value: Any) -> None:
    with pytest.raises(Unauthenticated):
        check_claims(POLICY, _payload(**{name: value}), NOW)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("iss", "trace-dispatcher "),
        ("iss", "Trace-Dispatcher"),
        ("iss", "https://idp.example.com"),
        ("aud", "trace-user"),
        ("aud", "trace-task2"),
        ("typ", "JWT"),
        ("typ", "trace-user+jwt"),
        ("typ", None),
    ],
)
def test_wrong_issuer_audience_or_type_is_unauthenticated(name: str, value: Any) -> None:
    with pytest.raises(Unauthenticated):
        check_claims(POLICY, _payload(**{name: value}), NOW)


def test_payload_must_be_a_mapping() -> None:
    with pytest.raises(Unauthenticated):
        check_claims(POLICY, ["not", "a", "mapping"], NOW)  # type: ignore[arg-type]


def test_expiry_with_leeway() -> None:
    c = _claims()  # exp = NOW + 120
    check_claims(POLICY, c.to_payload(), c.exp - 1)
    check_claims(POLICY, c.to_payload(), c.exp)  # inside leeway
    check_claims(POLICY, c.to_payload(), c.exp + POLICY.leeway_s - 1)
    with pytest.raises(Unauthenticated, match="expired"):
        check_claims(POLICY, c.to_payload(), c.exp + POLICY.leeway_s)
    with pytest.raises(Unauthenticated, match="expired"):
        check_claims(POLICY, c.to_payload(), c.exp + 10_000)


def test_issued_in_the_future_with_leeway() -> None:
    c = _claims()
    check_claims(POLICY, c.to_payload(), NOW - POLICY.leeway_s)  # skewed verifier, inside leeway
    with pytest.raises(Unauthenticated, match="future"):
        check_claims(POLICY, c.to_payload(), NOW - POLICY.leeway_s - 1)


def test_not_before_with_leeway() -> None:
    check_claims(POLICY, _payload(nbf=NOW + POLICY.leeway_s), NOW)
    with pytest.raises(Unauthenticated, match="not valid yet"):
        check_claims(POLICY, _payload(nbf=NOW + POLICY.leeway_s + 1), NOW)


def test_lifetime_over_the_maximum_is_rejected() -> None:
    check_claims(POLICY, _payload(exp=NOW + POLICY.max_ttl_s), NOW)
    with pytest.raises(Unauthenticated, match="lifetime"):
        check_claims(POLICY, _payload(exp=NOW + POLICY.max_ttl_s + 1), NOW)


@pytest.mark.parametrize("exp", [NOW, NOW - 1])
def test_non_positive_lifetime_is_rejected(exp: int) -> None:
    with pytest.raises(Unauthenticated):
        check_claims(POLICY, _payload(exp=exp), NOW - 5)


def test_custom_policy_is_honoured() -> None:
    policy = TokenPolicy(issuer="other", audience="aud2", typ="t+jwt", leeway_s=0, max_ttl_s=30)
    c = issue_claims(
        policy, org_id="o", task_id="t", attempt=1, attempt_timeout_s=600, now_epoch=NOW, jti="j"
    )
    assert c.exp - c.iat == 30
    assert check_claims(policy, c.to_payload(), NOW) == c
    with pytest.raises(Unauthenticated):
        check_claims(POLICY, c.to_payload(), NOW)
    with pytest.raises(Unauthenticated):
        check_claims(policy, c.to_payload(), c.exp)  # zero leeway


# -- check_binding ----------------------------------------------------------------------------


def test_binding_accepts_its_own_task_and_attempt() -> None:
    check_binding(_claims(), "task-1", 2)


@pytest.mark.parametrize(
    ("task_id", "attempt"), [("task-2", 2), ("task-1", 1), ("task-1", 3), ("TASK-1", 2)]
)
def test_binding_rejects_another_task_or_attempt(task_id: str, attempt: int) -> None:
    with pytest.raises(Forbidden):
        check_binding(_claims(), task_id, attempt)


# -- key rotation -----------------------------------------------------------------------------

T0 = 1_000_000.0


def test_rotation_table_covers_every_state() -> None:
    assert set(ROTATION) == set(KeyState)
    assert ROTATION[KeyState.NEXT] is KeyState.CURRENT
    assert ROTATION[KeyState.CURRENT] is KeyState.RETIRED
    assert ROTATION[KeyState.RETIRED] is KeyState.RETIRED


def test_bootstrap_signs_with_current_and_publishes_next() -> None:
    ring = KeyRing.bootstrap(T0, "k1", "k2")
    assert ring.signing_kid(T0) == "k1"
    assert ring.verifying_kids(T0) == ["k1", "k2"]
    assert ring.next is not None and ring.next.kid == "k2"
    assert ring.grace_s == POLICY.max_ttl_s + POLICY.leeway_s
    assert not ring.can_rotate(T0)


def test_rotate_promotes_next_retires_current_and_publishes_new() -> None:
    ring = KeyRing.bootstrap(T0, "k1", "k2")
    later = T0 + 600
    assert ring.can_rotate(later)
    r2 = ring.rotate(later, "k3")
    assert r2.signing_kid(later) == "k2"
    assert r2.verifying_kids(later) == ["k2", "k3", "k1"]
    states = {e.kid: e for e in r2.entries}
    assert states["k1"].state is KeyState.RETIRED and states["k1"].retired_at == later
    assert states["k2"].state is KeyState.CURRENT and states["k2"].activated_at == later
    assert states["k3"].state is KeyState.NEXT and states["k3"].published_at == later
    assert ring.signing_kid(later) == "k1"  # the old ring is untouched (pure)


def test_rotate_refuses_a_next_key_published_less_than_10_minutes_ago() -> None:
    ring = KeyRing.bootstrap(T0, "k1", "k2")
    with pytest.raises(Conflict, match="too recently"):
        ring.rotate(T0 + 599, "k3")
    # Rotating twice in a row is refused too: k3 was just published.
    r2 = ring.rotate(T0 + 600, "k3")
    with pytest.raises(Conflict):
        r2.rotate(T0 + 601, "k4")


def test_forced_rotation_skips_the_publish_age_check() -> None:
    ring = KeyRing.bootstrap(T0, "k1", "k2")
    r2 = ring.rotate(T0 + 1, "k3", force=True)
    assert r2.signing_kid(T0 + 1) == "k2"


def test_rotate_needs_a_next_key() -> None:
    ring = KeyRing.bootstrap(T0, "k1")
    with pytest.raises(Conflict, match="no next"):
        ring.rotate(T0 + 10_000, "k2")
    published = ring.publish_next(T0, "k2")
    assert published.rotate(T0 + 600, None).verifying_kids(T0 + 600) == ["k2", "k1"]


def test_publish_next_refuses_a_second_next_and_duplicates() -> None:
    ring = KeyRing.bootstrap(T0, "k1", "k2")
    with pytest.raises(Conflict):
        ring.publish_next(T0, "k3")
    with pytest.raises(ValidationFailed):
        KeyRing.bootstrap(T0, "k1").publish_next(T0, "k1")


def test_rotate_refuses_a_kid_already_in_the_ring() -> None:
    ring = KeyRing.bootstrap(T0, "k1", "k2")
    for kid in ("k1", "k2"):
        with pytest.raises(ValidationFailed):
            ring.rotate(T0 + 600, kid)


def test_retired_key_verifies_for_max_ttl_plus_leeway_then_is_dropped() -> None:
    ring = KeyRing.bootstrap(T0, "k1", "k2").rotate(T0 + 600, "k3")
    retired_at = T0 + 600
    grace = POLICY.max_ttl_s + POLICY.leeway_s
    assert "k1" in ring.verifying_kids(retired_at + grace)
    assert "k1" not in ring.verifying_kids(retired_at + grace + 1)
    # A token signed by k1 just before rotation, with the max TTL, is still inside its
    # validity (exp + leeway) exactly as long as k1 verifies.
    assert retired_at + POLICY.max_ttl_s + POLICY.leeway_s <= retired_at + grace
    # The next rotation after the grace drops it from the ring altogether.
    r3 = ring.rotate(retired_at + grace + 1, "k4")
    assert "k1" not in {e.kid for e in r3.entries}
    assert r3.verifying_kids(retired_at + grace + 1) == ["k3", "k4", "k2"]


def test_rotation_chain_never_rejects_a_live_token() -> None:
    """Across many rotations, any kid that signed at t verifies until t + max_ttl + leeway."""
    ring = KeyRing.bootstrap(T0, "k0", "k1")
    signed: list[tuple[str, float]] = []
    t = T0
    for i in range(2, 12):
        signed.append((ring.signing_kid(t), t))
        t += 600
        signed.append((ring.signing_kid(t - 1), t - 1))
        ring = ring.rotate(t, f"k{i}")
        for kid, at in signed:
            if t <= at + POLICY.max_ttl_s + POLICY.leeway_s:
                assert kid in ring.verifying_kids(t), (kid, at, t)


@pytest.mark.parametrize(
    "entries",
    [
        [],
        [KeyEntry("a", KeyState.NEXT, T0)],
        [
            KeyEntry("a", KeyState.CURRENT, T0, T0),
            KeyEntry("b", KeyState.CURRENT, T0, T0),
        ],
        [
            KeyEntry("a", KeyState.CURRENT, T0, T0),
            KeyEntry("b", KeyState.NEXT, T0),
            KeyEntry("c", KeyState.NEXT, T0),
        ],
        [KeyEntry("a", KeyState.CURRENT, T0, T0), KeyEntry("a", KeyState.NEXT, T0)],
        [KeyEntry("a", KeyState.CURRENT, T0, T0), KeyEntry("b", KeyState.RETIRED, T0)],
    ],
)
def test_illegal_rings_are_refused(entries: list[KeyEntry]) -> None:
    with pytest.raises(ValidationFailed):
        KeyRing(entries)


# -- revocation -----------------------------------------------------------------------------------


def test_revoking_the_current_key_promotes_next_at_once_and_never_trusts_it_again() -> None:
    ring = KeyRing.bootstrap(T0, "k1", "k2")
    revoked = ring.revoke(T0 + 1, "k1", "k3")  # one second after publish: no age check
    assert revoked.signing_kid(T0 + 1) == "k2"
    assert revoked.next is not None and revoked.next.kid == "k3"
    assert revoked.verifying_kids(T0 + 1) == ["k2", "k3"]
    assert "k1" in revoked.revoked
    # later rotations keep the revocation
    assert "k1" not in revoked.rotate(T0 + 10_000, "k4").verifying_kids(T0 + 10_000)


def test_revoking_next_replaces_it_and_revoking_retired_drops_it_before_grace_ends() -> None:
    ring = KeyRing.bootstrap(T0, "k1", "k2")
    assert ring.revoke(T0, "k2", "k3").verifying_kids(T0) == ["k1", "k3"]
    rotated = ring.rotate(T0 + 600, "k3")
    assert rotated.verifying_kids(T0 + 601) == ["k2", "k3", "k1"]
    assert rotated.revoke(T0 + 601, "k1", None).verifying_kids(T0 + 601) == ["k2", "k3"]


def test_revocation_refusals() -> None:
    ring = KeyRing.bootstrap(T0, "k1", "k2")
    with pytest.raises(NotFound):
        ring.revoke(T0, "nope", "k3")
    with pytest.raises(ValidationFailed):
        ring.revoke(T0, "k1", "k2")
    with pytest.raises(Conflict):  # nothing to promote
        KeyRing.bootstrap(T0, "k1").revoke(T0, "k1", None)


def test_a_revoked_current_key_never_signs() -> None:
    ring = attrs.evolve(KeyRing.bootstrap(T0, "k1", "k2"), revoked={"k1"})
    with pytest.raises(SignerError):
        ring.signing_kid(T0)
    assert ring.verifying_kids(T0) == ["k2"]
