"""Fixtures of the UDF suite: a Dispatcher process that sends ``runtime: lambda`` tasks to a
``trace udf runner`` process (``udf_procs``), and helpers to put Python bundles in the store.

The runner is started with only ``TRACE_HOME`` (its own, empty), ``TRACE_DISPATCHER_URL`` and
``PYTHONPATH``: no platform credential, no database URL. ``UDF_ISOLATION`` (``auto`` default)
picks the runner's isolation; as root ``auto`` means network + PID namespaces.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))

from e2e_harness import Proc, TraceProcs, free_port

from trace_core import udf
from trace_lite.udf import python_bundle


class UdfProcs(TraceProcs):
    """``TraceProcs`` plus a UDF runner the Dispatcher sends ``runtime: lambda`` tasks to."""

    def __init__(self, home: Path, db_url: str, *, lease_s: float) -> None:
        super().__init__(home, db_url, lease_s=lease_s)
        self.runner_port = free_port()
        self.runner_url = f"http://127.0.0.1:{self.runner_port}"
        self.runner_work = Path("/tmp") / f"trace-udf-test-{uuid.uuid4().hex[:10]}"
        self.runner: Proc | None = None

    def env(self) -> dict[str, str]:
        env = super().env()
        env["TRACE_UDF_RUNNER_URL"] = self.runner_url
        return env

    def start_runner(self, *extra: str, isolation: str | None = None) -> Proc:
        env = {
            k: v
            for k, v in self.env().items()
            if k in ("PATH", "PYTHONPATH", "PYTHONUNBUFFERED", "LANG", "TRACE_DISPATCHER_URL")
        }
        runner_home = self.home / "runner-home"
        runner_home.mkdir(exist_ok=True)
        env["TRACE_HOME"] = str(runner_home)
        iso = isolation or os.environ.get("UDF_ISOLATION", "auto")
        log_path = self.log_dir / f"{len(self.procs):03d}-udf-runner.log"
        with open(log_path, "ab") as out:
            popen = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "trace_servers.cli",
                    "udf",
                    "runner",
                    "--listen",
                    f"127.0.0.1:{self.runner_port}",
                    "--isolation",
                    iso,
                    "--work-dir",
                    str(self.runner_work),
                    *extra,
                ],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=runner_home,
            )
        proc = Proc("udf-runner", popen, log_path)
        self.procs.append(proc)
        self.runner = proc
        self.wait_until(self._runner_health, 30, "udf runner /healthz")
        return proc

    def _runner_health(self) -> dict[str, Any] | None:
        import http.client

        assert self.runner is not None
        if not self.runner.alive():
            raise AssertionError(f"udf runner exited\n{self.log_tails()}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.runner_port, timeout=2)
            conn.request("GET", "/healthz")
            resp = conn.getresponse()
            return json.loads(resp.read()) if resp.status == 200 else None
        except OSError:
            return None

    def runner_health(self) -> dict[str, Any]:
        health = self._runner_health()
        assert health is not None
        return health

    def org_id(self, name: str = "default") -> str:
        self.sql(
            "INSERT INTO orgs (org_id, name) VALUES (%s, %s) ON CONFLICT (name) DO NOTHING",
            (str(uuid.uuid4()), name),
        )
        return str(self.scalar("SELECT org_id::text FROM orgs WHERE name = %s", (name,)))

    def put_bundle(self, data: bytes, org: str = "default") -> dict[str, str]:
        """Store bundle bytes where the Dispatcher's store keeps them; returns the reference."""
        manifest = udf.parse_manifest(_manifest_bytes(data))
        ref = udf.BundleRef(manifest.name, udf.digest_of(data))
        path = self.object_root / "objects" / udf.bundle_key_for(self.org_id(org), ref)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return {"name": ref.name, "digest": ref.digest}

    def udf_pids(self) -> list[int]:
        """PIDs of live processes started for this runner's runtimes (their argv or working
        directory lies under the runner's work directory, or names a test marker)."""
        found = []
        assert self.runner is not None
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == self.runner.pid:
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes()
                status = (entry / "status").read_text()
            except OSError:
                continue
            if "State:\tZ" in status:
                continue
            if str(self.runner_work).encode() in cmdline or b"udf-marker-" in cmdline:
                found.append(int(entry.name))
        return found


def _manifest_bytes(data: bytes) -> bytes:
    import io
    import zipfile

    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return zf.read(udf.MANIFEST_NAME)


def py_bundle(
    name: str, source: str, *, memory_mb: int = 256, timeout_s: int | None = None
) -> bytes:
    """A Python bundle whose ``handler.py`` is ``source`` (dedented)."""
    manifest = udf.Manifest(
        name, udf.Language.PYTHON, "handler.handler", "", udf.Limits(memory_mb, timeout_s)
    )
    return python_bundle(manifest, {"handler.py": textwrap.dedent(source).encode()})


@pytest.fixture
def udf_procs(request: pytest.FixtureRequest, tmp_path: Path, db_url: str) -> Iterator[UdfProcs]:
    """A Dispatcher and a UDF runner on a fresh database (lease 3 s unless marked
    ``trace_lease``); everything is SIGKILLed at teardown."""
    marker = request.node.get_closest_marker("trace_lease")
    home = tmp_path / "home"
    home.mkdir()
    procs = UdfProcs(home, db_url, lease_s=float(marker.args[0]) if marker else 3.0)
    try:
        procs.start_dispatcher()
        yield procs
    finally:
        procs.stop_all()
        subprocess.run(["rm", "-rf", str(procs.runner_work)], check=False)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    rep = yield
    if rep.when == "call" and rep.failed:
        for procs in getattr(item, "funcargs", {}).values():
            if isinstance(procs, TraceProcs):
                rep.sections.append(("process logs", procs.log_tails(60)))
    return rep


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "trace_lease(seconds): lease of the e2e processes")
