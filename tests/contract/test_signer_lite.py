"""The Signer conformance suite on FileSigner (Ed25519 PEM files), plus rotation via files."""

from __future__ import annotations

import hashlib
import os
import stat
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from trace_core.errors import Conflict, NotFound, SignerError
from trace_core.jws import verify_token
from trace_core.ports import Signer
from trace_core.testing.conformance.signer import RotateSigner, SignerConformance
from trace_core.token import TokenPolicy, issue_claims
from trace_lite.capabilities import encode_token
from trace_lite.local_signer import FileSigner


class _Clock:
    def __init__(self) -> None:
        self.t = time.time()

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock() -> _Clock:
    return _Clock()


@pytest.fixture
async def signer(tmp_path: Path, clock: _Clock) -> FileSigner:
    return FileSigner.init(tmp_path / "keys", clock=clock)


@pytest.fixture
def rotate_signer() -> RotateSigner:
    async def rotate(signer: Signer) -> None:
        assert isinstance(signer, FileSigner)
        signer.rotate(force=True)

    return rotate


class TestFileSigner(SignerConformance):
    pass


def _kid_of(path: Path) -> str:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert isinstance(key, ed25519.Ed25519PrivateKey)
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


async def test_init_creates_private_key_files(tmp_path: Path) -> None:
    key_dir = tmp_path / "keys"
    FileSigner.init(key_dir)
    for name in ("current.pem", "next.pem"):
        mode = stat.S_IMODE((key_dir / name).stat().st_mode)
        assert mode == 0o600
    assert stat.S_IMODE(key_dir.stat().st_mode) == 0o700
    assert _kid_of(key_dir / "current.pem") != _kid_of(key_dir / "next.pem")


async def test_init_keeps_existing_keys(tmp_path: Path) -> None:
    key_dir = tmp_path / "keys"
    FileSigner.init(key_dir)
    before = (key_dir / "current.pem").read_bytes(), (key_dir / "next.pem").read_bytes()
    FileSigner.init(key_dir)
    assert ((key_dir / "current.pem").read_bytes(), (key_dir / "next.pem").read_bytes()) == before


async def test_kid_and_algorithm_come_from_the_files(signer: FileSigner) -> None:
    kid, alg, _ = await signer.sign(b"x")
    assert alg == "EdDSA"
    assert kid == _kid_of(signer.key_dir / "current.pem")
    keys = await signer.public_keys()
    assert [k.kid for k in keys] == [kid, _kid_of(signer.key_dir / "next.pem")]
    assert {k.algorithm for k in keys} == {"EdDSA"}


async def test_rotation_moves_the_files(signer: FileSigner, clock: _Clock) -> None:
    key_dir = signer.key_dir
    old_current = _kid_of(key_dir / "current.pem")
    old_next = _kid_of(key_dir / "next.pem")
    clock.t += 600
    assert signer.rotate() == old_next
    assert _kid_of(key_dir / "current.pem") == old_next
    assert (key_dir / "retired" / f"{old_current}.pem").exists()
    assert stat.S_IMODE((key_dir / "retired" / f"{old_current}.pem").stat().st_mode) == 0o600
    new_next = _kid_of(key_dir / "next.pem")
    assert new_next not in (old_current, old_next)
    assert [k.kid for k in await signer.public_keys()] == [old_next, new_next, old_current]


async def test_rotation_refuses_a_young_next_key_unless_forced(
    signer: FileSigner, clock: _Clock
) -> None:
    current = _kid_of(signer.key_dir / "current.pem")
    clock.t += 599
    with pytest.raises(Conflict):
        signer.rotate()
    assert _kid_of(signer.key_dir / "current.pem") == current
    assert not list((signer.key_dir / "retired").glob("*.pem"))
    signer.rotate(force=True)
    assert _kid_of(signer.key_dir / "current.pem") != current


async def test_retired_key_is_dropped_after_grace(signer: FileSigner, clock: _Clock) -> None:
    policy = TokenPolicy()
    now = int(clock.t)
    claims = issue_claims(
        policy, org_id="o", task_id="t", attempt=1, attempt_timeout_s=900, now_epoch=now, jti="j"
    )
    token = await encode_token(claims, signer)
    old = _kid_of(signer.key_dir / "current.pem")
    clock.t += 600
    signer.rotate()
    # Inside the grace (max TTL + leeway after retirement), the old key is still published
    # and the token verifies until it expires.
    clock.t += policy.max_ttl_s + policy.leeway_s
    keys = {k.kid: k for k in await signer.public_keys()}
    assert old in keys
    verify_token(token, keys, policy, claims.exp + policy.leeway_s - 1)
    clock.t += 1
    assert old not in {k.kid for k in await signer.public_keys()}
    # The next rotation deletes the expired private key from disk.
    signer.rotate()
    assert not (signer.key_dir / "retired" / f"{old}.pem").exists()


async def test_rotation_by_another_process_is_picked_up(tmp_path: Path, clock: _Clock) -> None:
    key_dir = tmp_path / "keys"
    a = FileSigner.init(key_dir, clock=clock)
    b = FileSigner(key_dir, clock=clock)
    a.recheck_s = 0.0  # signing re-reads the files at most every recheck_s (default 1 s)
    kid_before, _, _ = await a.sign(b"x")
    assert (await b.sign(b"x"))[0] == kid_before
    b.rotate(force=True)
    kid_after, _, sig = await a.sign(b"y")
    assert kid_after != kid_before
    assert await b.verify(kid_after, b"y", sig)


async def test_crash_after_copying_to_retired_is_harmless(signer: FileSigner) -> None:
    current = signer.key_dir / "current.pem"
    (signer.key_dir / "retired" / f"{_kid_of(current)}.pem").write_bytes(current.read_bytes())
    kids = [k.kid for k in await signer.public_keys()]
    assert len(kids) == len(set(kids)) == 2
    assert (await signer.sign(b"x"))[0] == _kid_of(current)


async def test_missing_next_is_tolerated_and_repaired_by_init(
    signer: FileSigner, clock: _Clock
) -> None:
    (signer.key_dir / "next.pem").unlink()
    assert len(await signer.public_keys()) == 1
    with pytest.raises(Conflict):
        signer.rotate(force=True)
    FileSigner.init(signer.key_dir, clock=clock)
    assert len(await signer.public_keys()) == 2


async def test_missing_or_bad_current_key_is_a_signer_error(tmp_path: Path) -> None:
    empty = FileSigner(tmp_path / "none")
    with pytest.raises(SignerError):
        await empty.sign(b"x")
    key_dir = tmp_path / "keys"
    FileSigner.init(key_dir)
    (key_dir / "current.pem").write_bytes(b"not a pem")
    with pytest.raises(SignerError):
        await FileSigner(key_dir).sign(b"x")
    p256 = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    (key_dir / "current.pem").write_bytes(p256)
    with pytest.raises(SignerError, match="Ed25519"):
        await FileSigner(key_dir).sign(b"x")


async def test_no_temp_files_left_behind(signer: FileSigner) -> None:
    signer.rotate(force=True)
    leftovers = [n for n in os.listdir(signer.key_dir) if n.endswith(".tmp")]
    assert leftovers == []


async def test_revocation_reaches_another_process_through_the_files(
    tmp_path: Path, clock: _Clock
) -> None:
    key_dir = tmp_path / "keys"
    a = FileSigner.init(key_dir, clock=clock)
    b = FileSigner(key_dir, clock=clock)  # another process on the same directory
    b.recheck_s = 0.0
    current = _kid_of(key_dir / "current.pem")
    nxt = _kid_of(key_dir / "next.pem")
    assert {k.kid for k in await b.public_keys()} == {current, nxt}
    signed_kid, _, sig = await a.sign(b"x")
    assert signed_kid == current and await b.verify(current, b"x", sig)
    assert a.revoke(current) == nxt  # the published next key signs at once, no age check
    assert current not in {k.kid for k in await b.public_keys()}
    assert (await b.sign(b"x"))[0] == nxt
    assert not await b.verify(current, b"x", sig)
    assert (key_dir / "revoked").read_text().split() == [current]
    assert not (key_dir / "retired" / f"{current}.pem").exists()
    assert stat.S_IMODE((key_dir / "revoked").stat().st_mode) == 0o600
    # a next key is replaced; a retired key (inside its grace) is dropped with its file
    new_next = _kid_of(key_dir / "next.pem")
    a.revoke(new_next)
    assert _kid_of(key_dir / "next.pem") not in (new_next, nxt)
    a.rotate(force=True)
    assert (key_dir / "retired" / f"{nxt}.pem").exists()
    a.revoke(nxt)
    assert not (key_dir / "retired" / f"{nxt}.pem").exists()
    kids = {k.kid for k in await b.public_keys()}
    assert kids.isdisjoint({current, new_next, nxt}) and len(kids) == 2
    assert sorted((key_dir / "revoked").read_text().split()) == sorted([current, new_next, nxt])


async def test_revoking_an_unknown_kid_changes_nothing(signer: FileSigner) -> None:
    before = sorted(os.listdir(signer.key_dir))
    with pytest.raises(NotFound):
        signer.revoke("0123456789abcdef")
    assert sorted(os.listdir(signer.key_dir)) == before
