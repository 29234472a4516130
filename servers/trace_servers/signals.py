"""How Trace's long-running processes learn they should stop.

Every asyncio process Trace runs (Dispatcher, worker, UDF runner, delivery sender, sinks, the
live demo) stops on SIGTERM or SIGINT by the same means: a handler on the running event loop
that sets an ``asyncio.Event`` (or calls a callback) which the process's loops wait on, so each
loop ends its current step and the process closes its pools before it exits. No handler raises
or exits by itself; what a process prints and which exit code it returns stay with the process.

``kill_hook`` is the other way a process ends, for the crash tests only: ``--kill-at POINT``
SIGKILLs it at a named point of its work, with no cleanup at all.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Awaitable, Callable

#: The signals that ask a Trace process to stop (``kill`` and Ctrl-C).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def on_stop_signals(callback: Callable[[], object]) -> None:
    """Call ``callback`` on the running event loop at each SIGTERM or SIGINT.

    Raises ``RuntimeError`` when no event loop is running."""
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, callback)


def stop_event() -> asyncio.Event:
    """Return an event that SIGTERM or SIGINT sets (see :func:`on_stop_signals`)."""
    stop = asyncio.Event()
    on_stop_signals(stop.set)
    return stop


def kill_hook(point: str | None) -> Callable[[str], Awaitable[None]] | None:
    """A fault hook for the crash tests (``--kill-at``): it SIGKILLs this process when it is
    called with ``point``. ``None`` (no hook) when ``point`` is not given."""
    if not point:
        return None

    async def fault(at: str) -> None:
        if at == point:
            os.kill(os.getpid(), signal.SIGKILL)

    return fault
