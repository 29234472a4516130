"""``trace`` CLI child processes for the benches (``trace sink run``, ``trace delivery run``):
their environment, start (until each says it is running) and stop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import trace_lite
import trace_servers

PLATFORM_TOKEN = "bench-platform-token-0123456789"


def source_path() -> str:
    """Where this process imports Trace from (a worktree's, given ``PYTHONPATH``): the child
    processes import the same code, so a before/after comparison runs each side's code."""
    roots = [Path(m.__file__ or "").parent.parent for m in (trace_lite, trace_servers)]
    return os.pathsep.join(dict.fromkeys(str(r) for r in roots))


def cli_env(home: Path, state_url: str, data_url: str | None = None) -> dict[str, str]:
    """The environment of a ``trace`` child on the bench's databases (no inherited
    ``TRACE_*``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACE_")}
    env |= {
        "TRACE_HOME": str(home),
        "TRACE_DATABASE_URL": state_url,
        "TRACE_PLATFORM_TOKEN": PLATFORM_TOKEN,
        "PYTHONPATH": source_path(),
    }
    if data_url is not None:
        env["TRACE_DATA_DATABASE_URL"] = data_url
    return env


def start_running(
    env: dict[str, str], argv: list[str], n: int, log_name: str
) -> list[subprocess.Popen[bytes]]:
    """``n`` ``python -m trace_servers.cli *argv`` processes, returned once each printed its
    ``"running"`` line; stderr goes to ``$TRACE_HOME/<log_name>-<i>.log``."""
    home = Path(env["TRACE_HOME"])
    procs = []
    for i in range(n):
        with open(home / f"{log_name}-{i}.log", "ab") as log:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "trace_servers.cli", *argv],
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=log,
                )
            )
    for proc in procs:
        assert proc.stdout is not None
        while b'"running"' not in (line := proc.stdout.readline()):
            if not line:
                stop(procs)
                raise RuntimeError(f"a {' '.join(argv[:2])} process exited: see {home}")
    return procs


def stop(procs: list[subprocess.Popen[bytes]], timeout_s: float = 30) -> None:
    """SIGTERM each (by PID), then wait; SIGKILL one that outlives ``timeout_s``."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
