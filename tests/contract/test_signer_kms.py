"""The Signer conformance suite on ``KmsSigner`` (ECC_NIST_P256 KMS keys → ES256) against a
moto server over real HTTP, plus alias rotation, key caching and key-spec pinning."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from trace_aws._boto import client
from trace_aws.kms_signer import KmsSigner, create_signing_key
from trace_core import errors
from trace_core.jws import unverified_kid
from trace_core.ports import Signer
from trace_core.testing.conformance.signer import RotateSigner, SignerConformance
from trace_core.token import TokenPolicy, issue_claims
from trace_lite.capabilities import TokenIssuer, TokenVerifier


@pytest.fixture(scope="module")
def kms(moto_server: Any) -> Any:
    return client("kms", endpoint_url=moto_server.url)


class _Clock:
    def __init__(self) -> None:
        self.t = 1_800_000_000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
async def signer(kms: Any) -> Any:
    current = await asyncio.to_thread(create_signing_key, kms=kms)
    nxt = await asyncio.to_thread(create_signing_key, kms=kms)
    s = KmsSigner(current, nxt, kms=kms)
    yield s
    await s.close()


@pytest.fixture
def rotate_signer(kms: Any) -> RotateSigner:
    async def rotate(s: Signer) -> None:
        assert isinstance(s, KmsSigner)
        await s.rotate(await asyncio.to_thread(create_signing_key, kms=kms), force=True)

    return rotate


class TestKmsSigner(SignerConformance):
    pass


def _claims(now: int) -> Any:
    return issue_claims(
        TokenPolicy(),
        org_id="o",
        task_id="t",
        attempt=1,
        attempt_timeout_s=60,
        now_epoch=now,
        jti=uuid.uuid4().hex,
    )


async def test_issuer_and_verifier_with_kms(signer: KmsSigner, kms: Any) -> None:
    calls: list[str] = []
    kms.meta.events.register("before-call.kms.*", lambda model, **_: calls.append(model.name))
    issuer = TokenIssuer(signer)
    verifier = TokenVerifier(signer)
    now = 1_800_000_000
    token = await issuer.encode(_claims(now))
    assert token.split(".")[0]  # header
    claims = await verifier.verify(token, now_epoch=now, monotonic=0.0)
    assert claims.task_id == "t"
    # public keys are cached: verifying many tokens calls KMS for signing only
    calls.clear()
    for _ in range(3):
        await verifier.verify(await issuer.encode(_claims(now)), now_epoch=now, monotonic=1.0)
    assert set(calls) == {"Sign"}


async def test_alias_rotation_is_picked_up_and_old_tokens_verify(kms: Any) -> None:
    tag = uuid.uuid4().hex[:8]
    cur_alias, next_alias = f"alias/trace-current-{tag}", f"alias/trace-next-{tag}"
    k1 = await asyncio.to_thread(create_signing_key, kms=kms, alias=cur_alias)
    k2 = await asyncio.to_thread(create_signing_key, kms=kms, alias=next_alias)
    clock = _Clock()
    signer = KmsSigner(cur_alias, next_alias, kms=kms, clock=clock, alias_ttl_s=60)
    policy = TokenPolicy()
    token = await TokenIssuer(signer).encode(_claims(int(clock.t)))
    old_kid = unverified_kid(token)
    before = [k.kid for k in await signer.public_keys()]
    assert before[0] == old_kid and len(before) == 2
    # the operator re-points the aliases: next becomes current, a fresh key becomes next
    k3 = await asyncio.to_thread(create_signing_key, kms=kms)
    kms.update_alias(AliasName=cur_alias, TargetKeyId=k2)
    kms.update_alias(AliasName=next_alias, TargetKeyId=k3)
    clock.t += 30
    assert (await signer.sign(b"x"))[0] == old_kid  # aliases cached for alias_ttl_s
    clock.t += 31
    new_kid, alg, _ = await signer.sign(b"x")
    assert alg == "ES256"
    assert new_kid == before[1]  # the published next key signs now
    kids = [k.kid for k in await signer.public_keys()]
    assert kids[0] == new_kid and old_kid in kids and len(kids) == 3
    verifier = TokenVerifier(signer, policy)
    assert (await verifier.verify(token, now_epoch=int(clock.t), monotonic=0.0)).task_id == "t"
    # after the grace period the retired key is gone
    clock.t += policy.key_grace_s + 1
    assert old_kid not in [k.kid for k in await signer.public_keys()]
    assert not await signer.verify(old_kid, b"x", b"\x00" * 64)
    del k1
    await signer.close()


async def test_non_p256_keys_are_refused(kms: Any) -> None:
    rsa = kms.create_key(KeySpec="RSA_2048", KeyUsage="SIGN_VERIFY")["KeyMetadata"]["KeyId"]
    signer = KmsSigner(rsa, kms=kms)
    with pytest.raises(errors.SignerError):
        await signer.sign(b"x")
    with pytest.raises(errors.SignerError):
        await signer.public_keys()
    assert await signer.verify("any", b"x", b"y") is False
    await signer.close()


async def test_unknown_key_and_dead_endpoint_are_signer_errors(moto_server: Any) -> None:
    signer = KmsSigner("alias/does-not-exist", endpoint_url=moto_server.url)
    with pytest.raises(errors.SignerError):
        await signer.sign(b"x")
    await signer.close()
    dead = KmsSigner("k", endpoint_url="http://127.0.0.1:9")
    dead._kms.meta.config.retries = {"max_attempts": 0}
    with pytest.raises(errors.SignerError):
        await dead.sign(b"x")
    await dead.close()
