"""``trace up`` keeps the stack running: a worker or Dispatcher killed under it is restarted
(with backoff, and said so on the console), instead of the whole stack stopping."""

from __future__ import annotations

import contextlib
import os
import re
import signal

from e2e_harness import Proc, TraceProcs


def _pids(up: Proc, what: str, name: str) -> list[int]:
    return [int(p) for p in re.findall(rf"{what} {name} \(pid (\d+)\)", up.tail(400))]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is not alive
        return f.read().split()[2] != "Z"


def test_up_restarts_a_killed_worker_and_dispatcher(trace_procs: TraceProcs) -> None:
    t = trace_procs
    up = t._spawn("up", "up", "--workers", "1", "--concurrency", "4")
    children: list[int] = []
    try:
        t.wait_ready(timeout=60)
        [worker] = t.wait_until(lambda: _pids(up, "started", "worker-0"), 30, "worker-0 to start")
        [dispatcher] = _pids(up, "started", "dispatcher")
        children += [worker, dispatcher]

        os.killpg(worker, signal.SIGKILL)
        [new_worker] = t.wait_until(
            lambda: _pids(up, "restarted", "worker-0"), 30, "worker-0 to be restarted"
        )
        children.append(new_worker)
        assert new_worker != worker and _alive(new_worker)
        assert re.search(r"worker-0 \(pid \d+\) exited with code -9 .*restarting in", up.tail())
        assert up.alive() and _alive(dispatcher), up.tail()

        os.killpg(dispatcher, signal.SIGKILL)
        [new_dispatcher] = t.wait_until(
            lambda: _pids(up, "restarted", "dispatcher"), 30, "the dispatcher to be restarted"
        )
        children.append(new_dispatcher)
        t.wait_ready(timeout=60)

        # the restarted stack still runs tasks
        ids = t.create_tasks([{"operator": "noop"} for _ in range(5)])
        assert t.wait_terminal(ids, timeout=60) == {"completed": 5}
        assert up.alive(), up.tail()

        assert t.terminate(up, timeout=60) == 0
        t.wait_until(
            lambda: not any(_alive(p) for p in (new_worker, new_dispatcher)),
            30,
            "the supervised children to stop with trace up",
        )
    finally:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
