"""The Signer conformance suite on the in-memory signer (EdDSA and ES256), plus its hooks."""

from __future__ import annotations

import pytest

from trace_core.errors import Conflict, SignerError
from trace_core.ports import Signer
from trace_core.testing.conformance.signer import RotateSigner, SignerConformance
from trace_core.testing.memory_signer import MemorySigner


class _Clock:
    def __init__(self) -> None:
        self.t = 1_800_000_000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture(params=["EdDSA", "ES256"])
async def signer(request: pytest.FixtureRequest) -> MemorySigner:
    return MemorySigner(request.param)


@pytest.fixture
def rotate_signer() -> RotateSigner:
    async def rotate(signer: Signer) -> None:
        assert isinstance(signer, MemorySigner)
        signer.rotate(force=True)

    return rotate


class TestMemorySigner(SignerConformance):
    pass


async def test_fail_next_sign() -> None:
    signer = MemorySigner()
    signer.fail_next_sign(SignerError("kms throttled"))
    with pytest.raises(SignerError):
        await signer.sign(b"x")
    kid, alg, _ = await signer.sign(b"x")
    assert (kid, alg) == (signer.current_kid, "EdDSA")
    assert signer.signed == [b"x"]


async def test_rotation_waits_for_next_to_be_published_10_minutes() -> None:
    clock = _Clock()
    signer = MemorySigner(clock=clock)
    first, nxt = signer.current_kid, signer.next_kid
    with pytest.raises(Conflict):
        signer.rotate()
    assert signer.current_kid == first
    assert len(await signer.public_keys()) == 2  # the refused rotation left no stray key
    clock.t += 600
    assert signer.rotate() == nxt
    assert [k.kid for k in await signer.public_keys()][:1] == [nxt]


async def test_retired_key_stops_verifying_after_grace() -> None:
    clock = _Clock()
    signer = MemorySigner(clock=clock)
    old = signer.current_kid
    _, _, sig = await signer.sign(b"x")
    signer.rotate(force=True)
    clock.t += 970
    assert await signer.verify(old, b"x", sig)
    clock.t += 1
    assert not await signer.verify(old, b"x", sig)
    assert old not in {k.kid for k in await signer.public_keys()}


def test_unknown_algorithm_is_refused() -> None:
    with pytest.raises(Exception, match="unsupported"):
        MemorySigner("HS256")
