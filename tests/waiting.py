"""Bounded waits for tests of asynchronous wake-ups: poll a condition until it holds, and fail
naming what did not happen (a missing wake-up shows as the wait running out, never as a hang)."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable


async def wait_until(
    check: Callable[[], bool | Awaitable[bool]], what: str, limit_s: float = 10.0
) -> None:
    """Poll ``check`` (a function or a coroutine function) every 20 ms until it answers true;
    raise ``AssertionError`` naming ``what`` after ``limit_s`` seconds."""
    for _ in range(int(limit_s / 0.02)):
        answer = check()
        if inspect.isawaitable(answer):
            answer = await answer
        if answer:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"not {what} within {limit_s} s")
