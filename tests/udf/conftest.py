"""Fixtures of the UDF suite: a Dispatcher process that sends ``runtime: lambda`` tasks to a
``trace udf runner`` process (``udf_procs``), the same plus a data database and a sink for DAGs
of UDFs (``udf_dag_procs``), helpers to put Python bundles in the store, and the steps the DAG
end-to-end tests share (deploy a bundle, deploy and trigger a DAG, read what an attempt did,
read a dataset's stored rows).

The runner is started with only ``TRACE_HOME`` (its own, empty), ``TRACE_DISPATCHER_URL`` and
``PYTHONPATH``: no platform credential, no database URL. ``UDF_ISOLATION`` (``auto`` default)
picks the runner's isolation; as root ``auto`` means network + PID namespaces.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))

from e2e_harness import Proc, TraceProcs, free_port

from trace_core import udf
from trace_lite.dag_runs import DagRuns
from trace_lite.dags import Dags
from trace_lite.datasets import table_name
from trace_lite.dispatcher import open_pool
from trace_lite.sink import load_dataset
from trace_lite.udf import python_bundle
from trace_servers.dag_cli import builtin_operators


class UdfProcs(TraceProcs):
    """``TraceProcs`` plus a UDF runner the Dispatcher sends ``runtime: lambda`` tasks to."""

    def __init__(
        self, home: Path, db_url: str, *, lease_s: float, data_db_url: str | None = None
    ) -> None:
        super().__init__(home, db_url, lease_s=lease_s)
        #: The data database of the Dispatcher and the sink (buffered datasets), if any.
        self.data_db_url = data_db_url
        self.runner_port = free_port()
        self.runner_url = f"http://127.0.0.1:{self.runner_port}"
        self.runner_work = Path("/tmp") / f"trace-udf-test-{uuid.uuid4().hex[:10]}"
        self.runner: Proc | None = None

    def env(self) -> dict[str, str]:
        env = super().env()
        env["TRACE_UDF_RUNNER_URL"] = self.runner_url
        if self.data_db_url is not None:
            env["TRACE_DATA_DATABASE_URL"] = self.data_db_url
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

    def start_sink(self, org: str = "default") -> Proc:
        sink = self._spawn("sink", "sink", "run", "--org", org)
        self.wait_until(lambda: "running" in sink.log_path.read_text(), 60, "the sink started")
        return sink

    def cli(self, *argv: str) -> Any:
        """Run ``trace <argv>`` against this deployment; its JSON answer (exit code 0)."""
        out = subprocess.run(
            [sys.executable, "-m", "trace_servers.cli", *argv],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=120,
            cwd=self.home,
        )
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    def deploy_bundle(self, path: Path) -> dict[str, str]:
        """``trace udf deploy <path>``; the bundle's reference (name and digest)."""
        deployed = self.cli("udf", "deploy", str(path))
        assert deployed["job"]["config"]["bundle"]["digest"] == deployed["digest"]
        return {"name": deployed["name"], "digest": deployed["digest"]}

    def deploy_and_trigger(self, dag: dict[str, Any], job: str, org: str = "default") -> None:
        """Deploy ``dag`` in ``org`` and trigger its (manual) ``job``."""

        async def run() -> None:
            pool = await open_pool(self.db_url, min_size=1, max_size=2)
            try:
                await Dags(pool, operators=builtin_operators()).deploy(None, org, dag)
                await DagRuns(pool).trigger(None, org, dag["name"], job)
            finally:
                await pool.close()

        asyncio.run(run())

    def completed_tasks(self, dag_job: str) -> list[str]:
        """Task ids of ``dag_job``'s completed tasks."""
        rows = self.sql(
            "SELECT task_id::text FROM tasks WHERE dag_job = %s AND state = 'completed'",
            (dag_job,),
        )
        return [task_id for (task_id,) in rows]

    def attempts(self, task_id: str) -> list[tuple[Any, ...]]:
        """``(attempt, outcome, error code)`` of each attempt of the task, in order."""
        return self.sql(
            "SELECT attempt, outcome, error->>'code' FROM task_attempts WHERE task_id = %s "
            "ORDER BY attempt",
            (task_id,),
        )

    def buffer_batches(self, task_id: str) -> list[tuple[Any, ...]]:
        """``(batch_key, attempt, row_count)`` of each buffer batch the task published."""
        return self.sql(
            "SELECT batch_key, attempt, row_count FROM buffer_batches WHERE task_id = %s",
            (task_id,),
        )

    def stored_rows(
        self, dataset: str, columns: list[str], org: str = "default"
    ) -> list[tuple[Any, ...]]:
        """``columns`` of the dataset's current version in the data database, ordered by
        them."""
        assert self.data_db_url is not None

        async def table() -> str:
            pool = await open_pool(self.db_url, min_size=1, max_size=2)
            try:
                ds = await load_dataset(pool, org, dataset)
                assert ds.dataset_version is not None
                return table_name(ds.dataset_version)
            finally:
                await pool.close()

        cols = sql.SQL(", ").join(map(sql.Identifier, columns))
        query = sql.SQL("SELECT {} FROM {} ORDER BY {}").format(
            cols, sql.Identifier(*asyncio.run(table()).split(".")), cols
        )
        with psycopg.connect(self.data_db_url, autocommit=True) as conn:
            return conn.execute(query).fetchall()


def buffered_output(schema: dict[str, str], unique_key: list[str]) -> list[dict[str, Any]]:
    """The ``outputs`` of a DAG job with one buffered, appended Postgres table."""
    return [
        {
            "storage": "postgres_table",
            "update_strategy": "append",
            "buffered": True,
            "unique_key": unique_key,
            "schema": schema,
        }
    ]


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


@pytest.fixture
def udf_dag_procs(tmp_path: Path, db_url: str, data_db_url: str) -> Iterator[UdfProcs]:
    """A Dispatcher with a data database, a UDF runner and the default org's sink (lease 3 s);
    everything is SIGKILLed at teardown."""
    home = tmp_path / "home"
    home.mkdir()
    procs = UdfProcs(home, db_url, lease_s=3.0, data_db_url=data_db_url)
    try:
        procs.start_dispatcher()
        procs.start_runner()
        procs.start_sink()
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
