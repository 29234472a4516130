"""Run an async worker function in child processes (spawned), with ready/stop flags."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
from collections.abc import Callable
from typing import Any


def _entry(fn: Callable[..., Any], args: tuple[Any, ...], ready: Any, stop: Any) -> None:
    asyncio.run(fn(*args, ready, stop))


class Children:
    """``n`` spawned processes running ``await fn(*args, ready_flag, stop_flag)``.

    ``fn`` sets ``ready_flag`` once it is listening, and returns soon after ``stop_flag`` is set.
    """

    def __init__(self, n: int, fn: Callable[..., Any], *args: Any) -> None:
        ctx = mp.get_context("spawn")
        self.stop = ctx.Event()
        self.ready = [ctx.Event() for _ in range(n)]
        self.procs = [
            ctx.Process(target=_entry, args=(fn, args, r, self.stop), daemon=True)
            for r in self.ready
        ]

    async def __aenter__(self) -> Children:
        for p in self.procs:
            p.start()
        for r, p in zip(self.ready, self.procs, strict=True):
            while not r.is_set():
                if not p.is_alive():
                    raise RuntimeError(f"a worker process died while starting ({p.exitcode})")
                await asyncio.sleep(0.02)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop.set()
        for p in self.procs:
            await asyncio.to_thread(p.join, 20)
            if p.is_alive():
                p.kill()
                await asyncio.to_thread(p.join, 5)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.pid is not None]


async def wait_flag(flag: Any, every: float = 0.05) -> None:  # a multiprocessing.Event
    while not flag.is_set():  # noqa: ASYNC110
        await asyncio.sleep(every)
