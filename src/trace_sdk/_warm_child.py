"""Warm single-use child processes: started ahead of need, each one runs one request.

A child started from ``WarmChildren.argv`` does its slow start at once (the interpreter, its
imports), then blocks reading its request from stdin. ``run`` hands a request to the idle
child (or starts one when none is idle), starts the next idle child straight away so the next
request does not pay the start either, and returns the child's exit code and stdout.

Invariants:

* A child serves exactly one request, so nothing carries over from one attempt to the next;
  at most one child is idle.
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

    def __init__(self, argv: Sequence[str]) -> None:
        self.argv = list(argv)
        self._idle: list[subprocess.Popen[bytes]] = []

    def _start(self) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=child_env()
        )

    def _take(self) -> subprocess.Popen[bytes]:
        while self._idle:
            proc = self._idle.pop()
            if proc.poll() is None:
                return proc
        return self._start()

    def prestart(self) -> None:
        """Start an idle child now unless one is idle."""
        if not any(p.poll() is None for p in self._idle):
            self._idle = [self._start()]

    async def run(self, request: bytes, *, timeout_s: float) -> tuple[int, bytes]:
        """Hand ``request`` (one line) to a child and wait for it to exit. Returns ``(exit
        code, stdout)``; raises ``TimeoutError`` after ``timeout_s`` (the child is killed)."""
        proc = self._take()
        self.prestart()
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
            raise
