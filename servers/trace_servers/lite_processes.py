"""Lite's Dispatcher and workers as supervised child processes (``trace up``, ``trace demo``).

Each child is ``python -m trace_servers.cli dispatcher|worker`` in its own session, its output
appended to ``<log_dir>/<name>.log``; ``trace_servers.supervisor`` restarts one that exits,
with backoff. ``wait_ready`` waits until the Dispatcher answers.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from trace_lite.config import LiteSettings
from trace_servers.supervisor import Supervisor


class LiteProcesses:
    """A Dispatcher and workers as supervised child processes (``trace_servers.supervisor``):
    one that exits is restarted with backoff, not left dead."""

    def __init__(
        self,
        settings: LiteSettings,
        state_url: str,
        data_url: str,
        workers: int,
        concurrency: int,
        log_dir: Path,
    ) -> None:
        self.settings = settings
        self.env = {
            **os.environ,
            **settings.env(),
            "TRACE_DATABASE_URL": state_url,
            "TRACE_DATA_DATABASE_URL": data_url,
        }
        self.workers = workers
        self.concurrency = concurrency
        self.log_dir = log_dir
        self.supervisor = Supervisor(self._spawn)

    @property
    def procs(self) -> list[subprocess.Popen[bytes]]:
        return self.supervisor.procs

    def _spawn(self, name: str, argv: Sequence[str]) -> subprocess.Popen[bytes]:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / f"{name}.log", "ab") as out:
            return subprocess.Popen(
                [sys.executable, "-m", "trace_servers.cli", *argv],
                env=self.env,
                stdout=out,
                stderr=out,
                start_new_session=True,
            )

    def start(self) -> None:
        self.supervisor.start("dispatcher", ["dispatcher"])
        for i in range(self.workers):
            self.supervisor.start(f"worker-{i}", ["worker", "--concurrency", str(self.concurrency)])

    def check(self) -> None:
        """Restart children that exited (see ``Supervisor.check``)."""
        self.supervisor.check()

    def stop(self, timeout: float = 40.0) -> None:
        self.supervisor.stop(timeout)


def wait_ready(url: str, limit_s: float = 60.0) -> None:
    """Return once the Dispatcher at ``url`` answers ``/readyz`` with 200; exit the CLI
    (``SystemExit``) when it did not within ``limit_s`` seconds."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        with contextlib.suppress(urllib.error.URLError, OSError):
            with urllib.request.urlopen(url + "/readyz", timeout=2) as resp:
                if resp.status == 200:
                    return
        time.sleep(0.1)
    raise SystemExit(f"the dispatcher at {url} did not become ready")


__all__ = ["LiteProcesses", "wait_ready"]
