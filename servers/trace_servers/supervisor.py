"""A local process supervisor for ``trace up``: keep the Dispatcher and the workers running.

A child that exits while the supervisor runs is restarted after a backoff, and the supervisor
says so (exit code, restart delay, new PID). The backoff doubles with each exit that follows a
short run (``backoff_base_s * 2**n``, capped at ``backoff_max_s``) and resets once a child has
run for ``stable_s``: a worker killed once comes back within ``backoff_base_s``, a child that
crashes on start does not spin. ``stop`` ends every child: SIGTERM, then SIGKILL after the
timeout. Time comes from ``clock`` so the policy can be tested without waiting.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from collections.abc import Callable, Sequence

import attrs

Spawn = Callable[[str, Sequence[str]], "subprocess.Popen[bytes]"]


@attrs.define
class _Child:
    name: str
    argv: tuple[str, ...]
    proc: subprocess.Popen[bytes]
    started_at: float
    #: Exits in a row that came after a short run.
    quick_exits: int = 0
    #: When a child that exited is due to be started again (None while it runs).
    restart_at: float | None = None


class Supervisor:
    """Starts children with ``spawn(name, argv)`` and restarts them when they exit."""

    def __init__(
        self,
        spawn: Spawn,
        *,
        clock: Callable[[], float] = time.monotonic,
        report: Callable[[str], None] | None = None,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 30.0,
        stable_s: float = 60.0,
    ) -> None:
        self._spawn = spawn
        self._clock = clock
        self._report = report or (lambda line: print(line, flush=True))
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.stable_s = stable_s
        self._children: list[_Child] = []
        #: How many restarts each child has had (for tests and status output).
        self.restarts: dict[str, int] = {}

    @property
    def procs(self) -> list[subprocess.Popen[bytes]]:
        """The current process of every child."""
        return [c.proc for c in self._children]

    def start(self, name: str, argv: Sequence[str]) -> subprocess.Popen[bytes]:
        """Start child ``name`` and supervise it."""
        proc = self._spawn(name, argv)
        self._children.append(_Child(name, tuple(argv), proc, self._clock()))
        self.restarts.setdefault(name, 0)
        self._report(f"started {name} (pid {proc.pid})")
        return proc

    def check(self) -> None:
        """One supervision pass: notice exits, schedule restarts, start children that are
        due. Call it periodically."""
        now = self._clock()
        for child in self._children:
            if child.restart_at is None:
                code = child.proc.poll()
                if code is None:
                    continue
                ran = now - child.started_at
                child.quick_exits = 0 if ran >= self.stable_s else child.quick_exits + 1
                delay = min(self.backoff_max_s, self.backoff_base_s * 2**child.quick_exits)
                child.restart_at = now + delay
                self._report(
                    f"{child.name} (pid {child.proc.pid}) exited with code {code} after "
                    f"{ran:.1f}s; restarting in {delay:.1f}s"
                )
            if child.restart_at is not None and now >= child.restart_at:
                child.proc = self._spawn(child.name, child.argv)
                child.started_at = now
                child.restart_at = None
                self.restarts[child.name] += 1
                self._report(f"restarted {child.name} (pid {child.proc.pid})")

    def stop(self, timeout: float = 40.0) -> None:
        """SIGTERM every running child, wait up to ``timeout``, then SIGKILL what is left."""
        procs = [c.proc for c in self._children]
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(max(0.1, deadline - time.monotonic()))
            if p.poll() is None:
                p.kill()
                p.wait()


__all__ = ["Supervisor"]
