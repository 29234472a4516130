"""User JWTs go through the kernel's JWS verification: same canonical parsing, pinned keys."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from trace_core.errors import Unauthenticated
from trace_core.jws import b64url_encode, public_key_for, verify_token
from trace_core.ports import PublicKey
from trace_core.token import TokenPolicy
from trace_lite.users import (
    LocalUserIssuer,
    UserAuthenticator,
    UserTokenPolicy,
    verify_user_token,
)

NOW = 1_800_000_000
POLICY = UserTokenPolicy()


@pytest.fixture
def issuer(tmp_path: Path) -> LocalUserIssuer:
    return LocalUserIssuer.init(tmp_path)


def _keys(issuer: LocalUserIssuer) -> dict[str, PublicKey]:
    return {issuer.key.kid: issuer.key}


def _seg(value: Any) -> str:
    return b64url_encode(json.dumps(value).encode())


def test_local_token_roundtrip_and_pyjwt_agrees(issuer: LocalUserIssuer) -> None:
    token = issuer.token("alice", now_epoch=NOW)
    identity = verify_user_token(token, _keys(issuer), POLICY, NOW)
    assert (identity.subject, identity.issuer) == ("alice", POLICY.issuer)
    decoded = jwt.decode(
        token,
        key=issuer._private.public_key(),
        algorithms=["EdDSA"],
        audience=POLICY.audience,
        options={"verify_exp": False, "verify_iat": False},
    )
    assert decoded["sub"] == "alice"


def test_an_external_es256_token_verifies_with_its_configured_key() -> None:
    private = ec.generate_private_key(ec.SECP256R1())
    key = public_key_for(private)
    claims = {
        "iss": POLICY.issuer,
        "aud": POLICY.audience,
        "sub": "bob",
        "typ": POLICY.typ,
        "iat": NOW,
        "exp": NOW + 600,
    }
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    token = jwt.encode(claims, pem, algorithm="ES256", headers={"kid": key.kid, "typ": POLICY.typ})
    assert verify_user_token(token, {key.kid: key}, POLICY, NOW).subject == "bob"


def test_respelled_user_tokens_are_refused(issuer: LocalUserIssuer) -> None:
    token = issuer.token("alice", now_epoch=NOW)
    for bad in (token + "==", token + "=", token.replace(".", "=.", 1)):
        with pytest.raises(Unauthenticated):
            verify_user_token(bad, _keys(issuer), POLICY, NOW)


def test_hs256_with_the_public_key_and_alg_none_are_refused(issuer: LocalUserIssuer) -> None:
    payload = {"iss": POLICY.issuer, "aud": POLICY.audience, "sub": "mallory", "typ": POLICY.typ}
    payload |= {"iat": NOW, "exp": NOW + 60}
    kid = issuer.key.kid
    for alg in ("none", "HS256"):
        signed = f"{_seg({'alg': alg, 'kid': kid, 'typ': POLICY.typ})}.{_seg(payload)}"
        sig = hmac.new(issuer.key.public_pem, signed.encode(), hashlib.sha256).digest()
        for token in (f"{signed}.", f"{signed}.{b64url_encode(sig)}"):
            with pytest.raises(Unauthenticated):
                verify_user_token(token, _keys(issuer), POLICY, NOW)


@pytest.mark.parametrize(
    ("change", "now"),
    [
        ({"aud": "trace-task"}, NOW),
        ({"iss": "someone-else"}, NOW),
        ({"typ": "trace-task+jwt"}, NOW),
        ({"sub": ""}, NOW),
        ({"exp": NOW + 25 * 3600}, NOW),
        ({}, NOW + 3600 + POLICY.leeway_s),
        ({}, NOW - POLICY.leeway_s - 1),
    ],
)
def test_claim_rules(issuer: LocalUserIssuer, change: dict[str, Any], now: int) -> None:
    token = issuer.token("alice", now_epoch=NOW, extra=change)
    with pytest.raises(Unauthenticated):
        verify_user_token(token, _keys(issuer), POLICY, now)


def test_user_and_capability_tokens_never_pass_for_each_other(issuer: LocalUserIssuer) -> None:
    user = issuer.token("alice", now_epoch=NOW)
    with pytest.raises(Unauthenticated):
        verify_token(user, _keys(issuer), TokenPolicy(), NOW)


def test_the_default_configuration_accepts_the_local_issuers_tokens(tmp_path: Path) -> None:
    # TRACE_USER_JWT_* unset (the documented default): the authenticator trusts the local issuer
    # and verifies with the same policy the issuer mints with.
    auth = UserAuthenticator.from_env(tmp_path, env={})
    assert auth.policy == UserTokenPolicy()
    token = LocalUserIssuer.init(tmp_path, policy=UserTokenPolicy.from_env({})).token("alice")
    assert auth.authenticate(f"Bearer {token}").subject == "alice"


def test_a_configured_issuer_and_audience_apply_to_both_sides(tmp_path: Path) -> None:
    env = {"TRACE_USER_JWT_ISSUER": "https://idp.example", "TRACE_USER_JWT_AUDIENCE": "trace"}
    auth = UserAuthenticator.from_env(tmp_path, env=env)
    assert (auth.policy.issuer, auth.policy.audience) == ("https://idp.example", "trace")
    minted = LocalUserIssuer.init(tmp_path, policy=UserTokenPolicy.from_env(env)).token("bob")
    assert auth.authenticate(f"Bearer {minted}").issuer == "https://idp.example"
    default = LocalUserIssuer.init(tmp_path, policy=UserTokenPolicy()).token("bob")
    with pytest.raises(Unauthenticated):
        auth.authenticate(f"Bearer {default}")


def _start_together(key_dir: Path, n: int) -> tuple[list[str], list[BaseException]]:
    barrier = threading.Barrier(n)
    kids: list[str] = []
    failures: list[BaseException] = []

    def start() -> None:
        barrier.wait()
        try:
            kids.append(LocalUserIssuer.init(key_dir).key.kid)
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=start) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return kids, failures


def test_processes_starting_together_agree_on_one_local_issuer_key(tmp_path: Path) -> None:
    # Several Dispatchers on a fresh TRACE_HOME create the key at once: none fails, none reads
    # a half-written file, all trust the same key.
    for attempt in range(20):
        kids, failures = _start_together(tmp_path / str(attempt), 8)
        assert failures == []
        assert len(kids) == 8 and len(set(kids)) == 1
