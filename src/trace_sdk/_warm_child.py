"""Warm single-use child processes: started ahead of need, each one runs one request.

A child started from ``WarmChildren.argv`` does its slow start at once (the interpreter, its
imports), then blocks reading its request from stdin. ``run`` hands a request to an idle
child (or starts one when none is idle), makes sure one child is idle straight away (the next
request may come before this one ends), and returns the child's exit code and stdout; when a
request ends, the idle children are topped up to as many as requests have run at once (the
high-water mark), at most ``max_idle``: a worker running N extracts at a time finds N warm
children after its first N, and a burst's starts do not compete with its extracts.

Invariants:

* A child serves exactly one request, so nothing carries over from one attempt to the next;
  at most ``max_idle`` children are idle.
* ``run`` kills its child (SIGKILL, through its own handle, never by name) at the timeout and
  when the awaiting task is cancelled, then raises.
* Children are started from the event loop's thread, so a child that asks Linux for
  ``PR_SET_PDEATHSIG`` dies with the worker process (the signal fires when the thread that
  started it ends; a helper thread could end first), with the worker's minimal environment
  (``child_env``: no platform credential). A request travels on stdin: what it holds (an
  endpoint with a key) is in neither the argv nor the environment of the process.
* An idle child whose worker closes its stdin (the worker exits) reads EOF and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import threading
from collections.abc import Sequence

from trace_sdk._process import child_env


class WarmChildren:
    """Single-use children of ``argv`` (see the module docstring)."""

    def __init__(self, argv: Sequence[str], *, max_idle: int = 4) -> None:
        self.argv = list(argv)
        self.max_idle = max_idle
        self._idle: list[subprocess.Popen[bytes]] = []
        self._running = 0
        self._most = 0  # the most requests ever running at once

    def _start(self) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=child_env()
        )

    def _take(self) -> subprocess.Popen[bytes]:
        while self._idle:
            proc = self._idle.pop(0)  # the oldest: the likeliest to be ready
            if proc.poll() is None:
                return proc
        return self._start()

    def prestart(self) -> None:
        """Top the idle children up to the high-water mark (at least one, at most
        ``max_idle``)."""
        self._top_up(min(max(self._most, 1), self.max_idle))

    def _top_up(self, want: int) -> None:
        self._idle = [p for p in self._idle if p.poll() is None]
        while len(self._idle) < want:
            self._idle.append(self._start())

    def idle(self) -> list[int]:
        """PIDs of the idle children."""
        return [p.pid for p in self._idle if p.poll() is None]

    def close(self) -> None:
        """End the idle children (EOF on their stdin) and reap them."""
        idle, self._idle = self._idle, []
        for proc in idle:
            with contextlib.suppress(OSError):
                proc.communicate(timeout=10)

    async def run(self, request: bytes, *, timeout_s: float) -> tuple[int, bytes]:
        """Hand ``request`` (one line) to a child and wait for it to exit. Returns ``(exit
        code, stdout)``; raises ``TimeoutError`` after ``timeout_s`` (the child is killed)."""
        proc = self._take()
        self._running += 1
        self._most = max(self._most, self._running)
        try:
            # one idle child at once (the next request may come before this one ends); the
            # rest when this one ends, so that a burst's starts do not compete with its extracts
            self._top_up(1)
            return await self._talk(proc, request, timeout_s)
        finally:
            self._running -= 1
            self.prestart()

    async def _talk(
        self, proc: subprocess.Popen[bytes], request: bytes, timeout_s: float
    ) -> tuple[int, bytes]:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[tuple[int, bytes]] = loop.create_future()

        def settle(code: int, out: bytes) -> None:
            if not done.done():
                done.set_result((code, out))

        def talk() -> None:
            try:
                out, _ = proc.communicate(request)
            except (OSError, ValueError):  # a broken pipe: the child died before reading
                out = b""
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(settle, proc.wait(), out)

        threading.Thread(target=talk, name="warm-child", daemon=True).start()
        try:
            return await asyncio.wait_for(asyncio.shield(done), timeout_s)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await asyncio.wait({done}, timeout=10)  # reaped by its thread
            raise
