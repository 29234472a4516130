"""The ObjectStore conformance suite on the in-memory adapter, plus its fault hooks."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from trace_core.errors import Forbidden, Unavailable
from trace_core.testing.conformance.object_store import FetchSigned, ObjectStoreConformance
from trace_core.testing.memory_store import MemoryObjectStore


class _Clock:
    def __init__(self) -> None:
        self.t = 1_800_000_000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock() -> _Clock:
    return _Clock()


@pytest.fixture
async def object_store(clock: _Clock) -> MemoryObjectStore:
    return MemoryObjectStore(clock=clock)


@pytest.fixture
def fetch_signed(object_store: MemoryObjectStore) -> FetchSigned:
    return object_store.fetch_signed


@pytest.fixture
def advance_clock(clock: _Clock) -> Callable[[float], None]:
    def advance(seconds: float) -> None:
        clock.t += seconds

    return advance


class TestMemoryObjectStore(ObjectStoreConformance):
    pass


async def test_fail_next_injects_one_failure_per_call(object_store: MemoryObjectStore) -> None:
    object_store.fail_next("put", Unavailable("disk on fire"))
    with pytest.raises(Unavailable):
        await object_store.put("a", b"1")
    assert await object_store.list("") == []  # nothing written
    await object_store.put("a", b"1")
    object_store.fail_next("get", Unavailable())
    object_store.fail_next("get", Unavailable())
    for _ in range(2):
        with pytest.raises(Unavailable):
            await object_store.get("a")
    assert await object_store.get("a") == b"1"
    assert object_store.calls[:3] == [("put", "a"), ("list", ""), ("put", "a")]


def test_fail_next_refuses_unknown_operations(object_store: MemoryObjectStore) -> None:
    with pytest.raises(ValueError):
        object_store.fail_next("copy", Unavailable())


async def test_verify_signed_url(object_store: MemoryObjectStore, clock: _Clock) -> None:
    url = await object_store.signed_url("org/1/a b", method="GET", expires_in=10)
    assert url.startswith("memory://org/1/a%20b?")
    assert object_store.verify_signed_url(url, clock.t) == "org/1/a b"
    assert object_store.verify_signed_url(url, clock.t, method="GET") == "org/1/a b"
    with pytest.raises(Forbidden):
        object_store.verify_signed_url(url, clock.t, method="PUT")
    with pytest.raises(Forbidden):
        object_store.verify_signed_url(url, clock.t + 10)
    with pytest.raises(Forbidden):
        MemoryObjectStore(clock=clock).verify_signed_url(url, clock.t)  # another store's secret
    with pytest.raises(Forbidden):
        object_store.verify_signed_url("https://example.com/x", clock.t)
