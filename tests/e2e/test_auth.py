"""The authentication/authorization matrix against a real Dispatcher process.

Tokens are crafted with the Dispatcher's own key files (``$TRACE_HOME/.trace/keys``) and the
kernel's claim and JWS helpers, so a refusal is the Dispatcher's decision, not a crafting bug
(a crafted valid token is accepted as a control).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from e2e_harness import PLATFORM_TOKEN, Response, TraceProcs

from trace_core.jws import b64url_encode, public_key_for, sign_jws
from trace_core.token import TokenPolicy, issue_claims

POLICY = TokenPolicy()


def _load(path: Path) -> ed25519.Ed25519PrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert isinstance(key, ed25519.Ed25519PrivateKey)
    return key


def _segment(obj: dict[str, Any]) -> str:
    return b64url_encode(json.dumps(obj, separators=(",", ":")).encode())


def _claims(
    org_id: str, task_id: str, attempt: int, *, now: int | None = None, timeout_s: int = 60
) -> dict[str, Any]:
    return issue_claims(
        POLICY,
        org_id=org_id,
        task_id=task_id,
        attempt=attempt,
        attempt_timeout_s=timeout_s,
        now_epoch=int(time.time()) if now is None else now,
        jti=uuid.uuid4().hex,
    ).to_payload()


def _sign(
    key: ed25519.Ed25519PrivateKey, payload: dict[str, Any], header: dict[str, Any] | None = None
) -> str:
    hdr = {"alg": "EdDSA", "kid": public_key_for(key).kid, "typ": POLICY.typ, **(header or {})}
    signing_input = f"{_segment(hdr)}.{_segment(payload)}".encode()
    return f"{signing_input.decode()}.{b64url_encode(sign_jws(key, signing_input))}"


def _fence(claim: dict[str, Any]) -> dict[str, Any]:
    return {k: claim[k] for k in ("task_id", "attempt", "lease_token")}


def _assert_error(r: Response, status: int | tuple[int, ...], code: str | None = None) -> None:
    statuses = (status,) if isinstance(status, int) else status
    assert r.status in statuses, r
    body = r.json
    assert isinstance(body, dict), r
    assert isinstance(body.get("error"), str) and body["error"], r
    assert isinstance(body.get("message"), str) and body["message"], r
    if code is not None:
        assert body["error"] == code, r


class Env:
    """A dispatcher with two claimed tasks; task ``a`` is on its second attempt."""

    def __init__(self, t: TraceProcs) -> None:
        self.t = t
        t.start_dispatcher()
        self.current = _load(t.key_dir / "current.pem")
        self.next = _load(t.key_dir / "next.pem")
        self.a_id = t.create_task("noop", max_attempts=5)
        self.b_id = t.create_task("noop", max_attempts=5)
        self.org_id = str(t.scalar("SELECT org_id FROM tasks WHERE task_id = %s", (self.a_id,)))
        self.a1 = t.claim(self.a_id)
        t.sql(
            "UPDATE tasks SET lease_expires_at = now() - interval '1s' WHERE task_id = %s",
            (self.a_id,),
        )
        t.wait_until(
            lambda: (
                t.scalar("SELECT state FROM tasks WHERE task_id = %s", (self.a_id,)) == "queued"
            ),
            15,
            "task a re-queued",
        )
        self.a2 = t.claim(self.a_id)
        assert self.a2["attempt"] == 2
        self.b1 = t.claim(self.b_id)

    def heartbeat(self, token: str | None, fence: dict[str, Any]) -> Response:
        return self.t.request("POST", "/v1/task/heartbeat", capability=token, body=fence)


@pytest.fixture
def env(trace_procs: TraceProcs) -> Env:
    return Env(trace_procs)


def test_auth_matrix(env: Env) -> None:
    t = env.t
    a2_fence, a1_fence = _fence(env.a2), _fence(env.a1)
    before = t.counts()

    # control: the Dispatcher's own token and a crafted token with the current key both work
    _ok = env.heartbeat(env.a2["capability_token"], a2_fence)
    assert _ok.status == 200, _ok
    crafted = _sign(env.current, _claims(env.org_id, env.a_id, 2))
    assert env.heartbeat(crafted, a2_fence).status == 200

    # the same token spelled another way (padding, non-zero trailing bits): refused, although
    # its bytes were verified above and the Dispatcher minted it
    own = env.a2["capability_token"]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    trailing = own[:-1] + alphabet[alphabet.index(own[-1]) | 1]
    for respelled in (own + "==", own + "=", trailing, crafted + "=="):
        _assert_error(env.heartbeat(respelled, a2_fence), 401, "unauthenticated")

    # missing token
    _assert_error(env.heartbeat(None, a2_fence), 401, "unauthenticated")
    r = t.request(
        "POST", "/v1/task/heartbeat", body=a2_fence, headers={"X-Trace-Task-Capability": ""}
    )
    _assert_error(r, 401, "unauthenticated")
    assert r.headers.get("WWW-Authenticate", "").startswith("Bearer")
    # a platform credential is not a capability token
    r = t.request("POST", "/v1/task/heartbeat", body=a2_fence, platform=True)
    _assert_error(r, 401, "unauthenticated")

    # token for another task
    _assert_error(env.heartbeat(env.b1["capability_token"], a2_fence), 403, "forbidden")
    _assert_error(env.heartbeat(env.a2["capability_token"], _fence(env.b1)), 403, "forbidden")

    # token for another attempt, both directions
    _assert_error(env.heartbeat(env.a1["capability_token"], a2_fence), 403, "forbidden")
    _assert_error(env.heartbeat(env.a2["capability_token"], a1_fence), 403, "forbidden")
    r = t.request(
        "POST",
        "/v1/task/complete",
        capability=env.a1["capability_token"],
        body={**a2_fence, "result": {"x": 1}},
    )
    _assert_error(r, 403, "forbidden")

    # expired (signed with the Dispatcher's current key, exp an hour ago)
    expired = _sign(env.current, _claims(env.org_id, env.a_id, 2, now=int(time.time()) - 3600))
    _assert_error(env.heartbeat(expired, a2_fence), 401, "unauthenticated")

    # right token, wrong lease token
    r = env.heartbeat(env.a2["capability_token"], {**a2_fence, "lease_token": str(uuid.uuid4())})
    _assert_error(r, 409, "lease_lost")

    # signed with the published NEXT key: accepted (nothing rejected mid-rotation)
    next_signed = _sign(env.next, _claims(env.org_id, env.a_id, 2))
    r = env.heartbeat(next_signed, a2_fence)
    assert r.status == 200, r
    r = t.request(
        "POST",
        "/v1/task/events",
        capability=next_signed,
        body={**a2_fence, "events": [{"key": "via-next", "type": "progress"}]},
    )
    assert r.status == 200 and r.json["accepted"] == 1, r

    # unknown kid (a key the Dispatcher never published)
    stranger = ed25519.Ed25519PrivateKey.generate()
    _assert_error(
        env.heartbeat(_sign(stranger, _claims(env.org_id, env.a_id, 2)), a2_fence),
        401,
        "unauthenticated",
    )
    # a stranger's signature under the current kid
    forged = _sign(
        stranger, _claims(env.org_id, env.a_id, 2), {"kid": public_key_for(env.current).kid}
    )
    _assert_error(env.heartbeat(forged, a2_fence), 401, "unauthenticated")

    # alg: none
    kid = public_key_for(env.current).kid
    payload = _claims(env.org_id, env.a_id, 2)
    none_token = f"{_segment({'alg': 'none', 'kid': kid, 'typ': POLICY.typ})}.{_segment(payload)}."
    _assert_error(env.heartbeat(none_token, a2_fence), 401, "unauthenticated")

    # HS256 with the public key PEM as the HMAC secret (algorithm confusion)
    pem = public_key_for(env.current).public_pem
    signing_input = (
        f"{_segment({'alg': 'HS256', 'kid': kid, 'typ': POLICY.typ})}.{_segment(payload)}".encode()
    )
    mac = hmac.new(pem, signing_input, hashlib.sha256).digest()
    hs_token = f"{signing_input.decode()}.{b64url_encode(mac)}"
    _assert_error(env.heartbeat(hs_token, a2_fence), 401, "unauthenticated")

    # a user-style token (other audience/type) signed with the real key
    other_aud = {**payload, "aud": "trace-user"}
    _assert_error(env.heartbeat(_sign(env.current, other_aud), a2_fence), 401, "unauthenticated")
    _assert_error(
        env.heartbeat(_sign(env.current, payload, {"typ": "JWT"}), a2_fence), 401, "unauthenticated"
    )
    # garbage
    _assert_error(env.heartbeat("not-a-jwt", a2_fence), 401, "unauthenticated")

    # nothing above wrote anything except the one accepted event via the next key
    after = t.counts()
    assert after == {**before, "task_events": before["task_events"] + 1}, (before, after)


def test_internal_routes_need_the_platform_credential(env: Env) -> None:
    t = env.t
    c_id = t.create_task("noop")
    cap = env.a2["capability_token"]
    before = t.counts()
    claim_body = {"task_id": c_id, "worker_id": "intruder"}

    # a capability token on /internal/task-claim: as Bearer, and in the capability header
    r = t.request(
        "POST", "/internal/task-claim", body=claim_body, headers={"Authorization": f"Bearer {cap}"}
    )
    _assert_error(r, 401, "unauthenticated")
    r = t.request("POST", "/internal/task-claim", body=claim_body, capability=cap)
    _assert_error(r, (401, 403))
    r = t.request(
        "POST",
        "/internal/task-claim",
        body=claim_body,
        headers={"Authorization": f"Bearer {cap}", "X-Trace-Task-Capability": cap},
    )
    _assert_error(r, (401, 403))

    internal = [
        ("POST", "/internal/task-claim", claim_body),
        ("GET", f"/internal/task-fetch?task_id={c_id}", None),
        ("POST", "/internal/admin/tasks", {"tasks": [{"operator": "noop"}]}),
        ("GET", f"/internal/admin/tasks/{c_id}", None),
        ("POST", f"/internal/admin/tasks/{c_id}/cancel", None),
        ("GET", "/internal/admin/counts", None),
    ]
    wrong_headers: list[dict[str, str]] = [
        {},  # anonymous
        {"Authorization": "Bearer wrong-platform-token-0123456789"},
        {"Authorization": f"Bearer {PLATFORM_TOKEN}x"},
        {"Authorization": f"Basic {PLATFORM_TOKEN}"},
        {"Authorization": PLATFORM_TOKEN},
        {"Authorization": "Bearer "},
    ]
    for method, path, body in internal:
        for headers in wrong_headers:
            r = t.request(method, path, body=body, headers=headers)
            _assert_error(r, 401, "unauthenticated")
            assert r.headers.get("WWW-Authenticate", "").startswith("Bearer"), (path, r)

    assert t.counts() == before
    assert t.sql("SELECT state, attempt FROM tasks WHERE task_id = %s", (c_id,)) == [("queued", 0)]
    # control: the right credential works
    r = t.request("GET", "/internal/admin/counts", platform=True)
    assert r.status == 200, r


def _trace_cli(t: TraceProcs, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trace_servers.cli", *argv],
        env=t.env(),
        cwd=t.home,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_trace_keys_revoke_reaches_the_running_dispatcher(trace_procs: TraceProcs) -> None:
    t = trace_procs
    t.start_dispatcher()
    task_id = t.create_task("noop", max_attempts=5)
    org_id = str(t.scalar("SELECT org_id FROM tasks WHERE task_id = %s", (task_id,)))
    claim = t.claim(task_id)
    fence = _fence(claim)
    current = _load(t.key_dir / "current.pem")
    revoked_kid = public_key_for(current).kid
    # minted (and remembered) by the Dispatcher, and one it verifies and remembers once
    minted = claim["capability_token"]
    crafted = _sign(current, _claims(org_id, task_id, claim["attempt"]))

    def heartbeat(token: str) -> Response:
        return t.request("POST", "/v1/task/heartbeat", capability=token, body=fence)

    for token in (minted, crafted):
        assert heartbeat(token).status == 200

    done = _trace_cli(t, "keys", "revoke", revoked_kid)
    assert done.returncode == 0, done.stderr
    assert revoked_kid not in {k["kid"] for k in json.loads(done.stdout)}

    def refused(token: str) -> bool:
        r = heartbeat(token)
        assert r.status in (200, 401), r  # accepted until the Dispatcher re-reads its keys
        return r.status == 401

    for token in (minted, crafted):
        t.wait_until(lambda token=token: refused(token), 30, "the revoked key refused")
        _assert_error(heartbeat(token), 401, "unauthenticated")
    # a freshly crafted token with the revoked key: refused at once now
    _assert_error(heartbeat(_sign(current, _claims(org_id, task_id, 1))), 401, "unauthenticated")

    # the promoted key signs new tokens, and they are accepted
    new_current = _load(t.key_dir / "current.pem")
    assert public_key_for(new_current).kid != revoked_kid
    other = t.claim(t.create_task("noop", max_attempts=5))
    r = t.request(
        "POST", "/v1/task/heartbeat", capability=other["capability_token"], body=_fence(other)
    )
    assert r.status == 200, r
    fresh = _sign(new_current, _claims(org_id, other["task_id"], other["attempt"]))
    r = t.request("POST", "/v1/task/heartbeat", capability=fresh, body=_fence(other))
    assert r.status == 200, r

    # an unknown kid is refused by the command, and nothing changes
    done = _trace_cli(t, "keys", "revoke", "0123456789abcdef")
    assert done.returncode == 1 and json.loads(done.stderr)["error"] == "not_found"


def test_the_default_user_token_configuration_works_end_to_end(trace_procs: TraceProcs) -> None:
    """TRACE_USER_JWT_* unset (the documented default: Lite's local issuer): a token from
    ``trace users token`` is accepted by the running Dispatcher's user API."""
    t = trace_procs
    assert not any(k.startswith("TRACE_USER_JWT") for k in t.env())
    t.start_dispatcher()
    minted = _trace_cli(t, "users", "token", "--sub", "alice")
    assert minted.returncode == 0, minted.stderr
    token = minted.stdout.strip()
    added = _trace_cli(t, "users", "add-member", "acme", "alice", "--roles", "admin")
    assert added.returncode == 0, added.stderr

    env = {**t.env(), "TRACE_USER_TOKEN": token}
    listed = subprocess.run(
        [sys.executable, "-m", "trace_servers.cli", "datasets", "list", "--org", "acme"],
        env=env,
        cwd=t.home,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout) == {"datasets": []}
    r = t.request("GET", "/v1/orgs/acme/datasets", headers={"Authorization": f"Bearer {token}"})
    assert r.status == 200 and r.json == {"datasets": []}, r
    # and a token that is not the local issuer's is still refused
    bad = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
    r = t.request("GET", "/v1/orgs/acme/datasets", headers={"Authorization": f"Bearer {bad}"})
    _assert_error(r, 401, "unauthenticated")
