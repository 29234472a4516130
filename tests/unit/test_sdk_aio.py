"""``trace_sdk.aio``: the one background-loop helper and the one micro-batcher."""

from __future__ import annotations

import asyncio
import logging

import pytest

from trace_core import errors
from trace_sdk.aio import Coalescer, run_every


async def test_run_every_keeps_going_after_errors_and_stops_on_stop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stop = asyncio.Event()
    calls: list[int] = []

    async def tick() -> None:
        calls.append(len(calls))
        if len(calls) == 1:
            raise errors.Unavailable("database down")
        if len(calls) == 2:
            raise KeyError("a bug")
        if len(calls) == 4:
            stop.set()

    with caplog.at_level(logging.WARNING, logger="trace.aio"):
        await asyncio.wait_for(
            run_every(stop, 0.001, tick, name="tick", backoff_base_s=0.001), timeout=30
        )
    assert calls == [0, 1, 2, 3]
    messages = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert (logging.WARNING, "tick failed") in messages
    crashed = [r for r in caplog.records if r.getMessage() == "tick crashed; going on"]
    assert crashed and crashed[0].exc_info is not None


async def test_run_every_wakes_at_once_when_stop_is_set() -> None:
    stop = asyncio.Event()
    ran = asyncio.Event()

    async def tick() -> None:
        ran.set()

    loop = asyncio.create_task(run_every(stop, 3600, tick, name="hourly"))
    await ran.wait()
    stop.set()
    # an hour-long sleep that did not wake on stop would time out here
    await asyncio.wait_for(loop, timeout=30)


async def test_run_every_backs_off_while_failing(monkeypatch: pytest.MonkeyPatch) -> None:
    stop = asyncio.Event()
    delays: list[float] = []

    async def failing() -> None:
        raise errors.Unavailable("down")

    import trace_sdk.aio as aio

    real = aio.sleep_or_stop

    async def record(stop_: asyncio.Event, seconds: float) -> None:
        delays.append(seconds)
        if len(delays) == 6:
            stop_.set()
        await real(stop_, 0)

    monkeypatch.setattr(aio, "sleep_or_stop", record)
    await run_every(stop, 1.0, failing, name="f", backoff_base_s=0.5, backoff_max_s=4.0)
    assert delays == [1.0, 2.0, 4.0, 4.0, 4.0, 4.0]


async def test_coalescer_gives_each_caller_its_own_result_or_error() -> None:
    async def square(items: list[int]) -> list[int | BaseException]:
        return [ValueError(f"odd {i}") if i % 2 else i * i for i in items]

    c: Coalescer[int, int] = Coalescer(square)
    results = await asyncio.gather(*(c.submit(i) for i in range(6)), return_exceptions=True)
    assert results[0::2] == [0, 4, 16]
    assert [str(r) for r in results[1::2]] == ["odd 1", "odd 3", "odd 5"]
    assert c.batch_sizes == [6]  # submitted in the same tick: one batch


async def test_coalescer_batches_by_size_and_grows_while_a_flush_is_in_flight() -> None:
    release = asyncio.Event()
    seen: list[list[int]] = []

    async def flush(items: list[int]) -> list[int | BaseException]:
        seen.append(items)
        if len(seen) == 1:
            await release.wait()
        return list(items)

    c: Coalescer[int, int] = Coalescer(flush, max_batch=3)
    first = asyncio.ensure_future(c.submit(0))
    await asyncio.sleep(0.01)
    assert seen == [[0]]  # idle: flushed at once, alone
    later = [asyncio.ensure_future(c.submit(i)) for i in range(1, 8)]
    await asyncio.sleep(0)
    assert len(seen) == 1  # one flush at a time
    release.set()
    assert await asyncio.gather(first, *later) == list(range(8))
    assert seen == [[0], [1, 2, 3], [4, 5, 6], [7]]


async def test_coalescer_never_puts_two_items_of_one_key_in_a_batch() -> None:
    seen: list[list[str]] = []

    async def flush(items: list[str]) -> list[str | BaseException]:
        seen.append(items)
        return items

    c: Coalescer[str, str] = Coalescer(flush, key=lambda s: s[0])
    await asyncio.gather(c.submit("a1"), c.submit("b1"), c.submit("a2"))
    assert seen == [["a1", "b1"], ["a2"]]


async def test_coalescer_reports_a_failed_flush_to_every_caller_of_that_batch() -> None:
    calls = 0

    async def flush(items: list[int]) -> list[int | BaseException]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise errors.Unavailable("down")
        return items

    c: Coalescer[int, int] = Coalescer(flush)
    results = await asyncio.gather(c.submit(1), c.submit(2), return_exceptions=True)
    assert all(isinstance(r, errors.Unavailable) for r in results)
    assert await c.submit(3) == 3  # the next batch is not affected


async def test_coalescer_close_drains_then_refuses() -> None:
    async def flush(items: list[int]) -> list[int | BaseException]:
        await asyncio.sleep(0.01)
        return items

    c: Coalescer[int, int] = Coalescer(flush, max_batch=2)
    futs = [c.submit_nowait(i) for i in range(5)]
    await c.close()
    assert all(f.done() for f in futs)
    assert [f.result() for f in futs] == list(range(5))
    with pytest.raises(errors.Unavailable):
        await c.submit(9)
