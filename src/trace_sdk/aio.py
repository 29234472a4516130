"""Two asyncio building blocks shared by the Dispatcher, the worker and the servers.

``run_every`` is the one background loop: call a function every ``every_s`` until a stop event
is set, log and keep going when it fails (backing off while it keeps failing), and wake at once
when the stop event is set instead of finishing a sleep.

``Coalescer`` is the one micro-batcher: callers ``submit`` one item each and get their own
result (or their own exception) back, while a single flusher hands the items queued at that
moment to a batch function. Invariants:

- one flush runs at a time; items submitted while it runs form the next batch, so batches grow
  with load and nothing waits when idle (the flusher yields once to the event loop so items of
  the same tick join, plus ``linger_s`` if set);
- a batch holds at most ``max_batch`` items and at most one item per ``key`` (two items with the
  same key are never flushed together: the second goes in a later batch);
- the batch function returns one value per item, in order; a returned ``BaseException`` is
  raised to that item's caller only; if the batch function raises, every caller of that batch
  gets the exception;
- ``close`` flushes everything already submitted, then refuses new items.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import Generic, TypeVar

from trace_core import errors

log = logging.getLogger("trace.aio")

T = TypeVar("T")
R = TypeVar("R")


async def sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    """Sleep ``seconds``, or less if ``stop`` is set meanwhile."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


async def run_every(
    stop: asyncio.Event,
    every_s: float,
    fn: Callable[[], Awaitable[object]],
    *,
    name: str,
    backoff_base_s: float = 0.2,
    backoff_max_s: float = 5.0,
    logger: logging.Logger | None = None,
) -> None:
    """Await ``fn()`` every ``every_s`` seconds until ``stop`` is set.

    A ``TraceError`` from ``fn`` is logged as a warning, any other exception with its traceback
    (a bug must not silently stop a background loop); either way the loop goes on, waiting
    ``min(backoff_max_s, backoff_base_s * 2**failures)`` instead of ``every_s`` while ``fn``
    keeps failing. Returns once ``stop`` is set; never raises except ``CancelledError``.
    """
    logger = logger or log
    failures = 0
    while not stop.is_set():
        try:
            await fn()
            failures = 0
        except errors.TraceError as exc:
            failures += 1
            logger.warning("%s failed", name, extra={"loop": name, "error": str(exc)})
        except Exception:
            failures += 1
            logger.exception("%s crashed; going on", name, extra={"loop": name})
        delay = every_s if not failures else min(backoff_max_s, backoff_base_s * 2**failures)
        await sleep_or_stop(stop, delay)


class Coalescer(Generic[T, R]):
    """Coalesces concurrent ``submit`` calls into calls of ``flush(items)`` (see the module
    docstring for the invariants)."""

    def __init__(
        self,
        flush: Callable[[list[T]], Awaitable[Sequence[R | BaseException]]],
        *,
        max_batch: int = 256,
        key: Callable[[T], Hashable] | None = None,
        linger_s: float = 0.0,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._flush = flush
        self._max_batch = max_batch
        self._key = key
        self._linger_s = linger_s
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._closed = False
        #: Sizes of the batches flushed so far (for metrics and tests).
        self.batch_sizes: list[int] = []

    async def submit(self, item: T) -> R:
        """Queue ``item`` for the next batch; return its result or raise its exception.

        Raises ``Unavailable`` once the coalescer is closed. Canceling the caller drops the item
        if its batch has not started yet."""
        return await self.submit_nowait(item)

    def submit_nowait(self, item: T) -> asyncio.Future[R]:
        """Queue ``item`` and return the future of its result without waiting for it."""
        if self._closed:
            raise errors.Unavailable("shutting down")
        fut: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append((item, fut))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._run())
        return fut

    async def close(self) -> None:
        """Flush everything submitted so far, then refuse new items."""
        self._closed = True
        while self._flusher is not None and not self._flusher.done():
            await asyncio.shield(self._flusher)

    def _take_batch(self) -> list[tuple[T, asyncio.Future[R]]]:
        batch: list[tuple[T, asyncio.Future[R]]] = []
        rest: list[tuple[T, asyncio.Future[R]]] = []
        seen: set[Hashable] = set()
        for entry in self._pending:
            item, fut = entry
            if fut.done():  # the caller went away
                continue
            k = self._key(item) if self._key is not None else None
            if len(batch) >= self._max_batch or (k is not None and k in seen):
                rest.append(entry)
            else:
                if k is not None:
                    seen.add(k)
                batch.append(entry)
        self._pending = rest
        return batch

    async def _run(self) -> None:
        await asyncio.sleep(self._linger_s)  # let items of the same moment join
        while self._pending:
            batch = self._take_batch()
            if not batch:
                continue
            self.batch_sizes.append(len(batch))
            try:
                results = await self._flush([item for item, _ in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"flush returned {len(results)} results for {len(batch)}")
            except Exception as exc:
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for (_, fut), res in zip(batch, results, strict=True):
                if fut.done():
                    continue
                if isinstance(res, BaseException):
                    fut.set_exception(res)
                else:
                    fut.set_result(res)


__all__ = ["Coalescer", "run_every", "sleep_or_stop"]
