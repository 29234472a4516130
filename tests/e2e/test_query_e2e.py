"""``trace query`` against a real Dispatcher process: the CLI posts to /v1/query, the server
spawns a sandbox process per query, and the answer prints as an aligned table."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest
from e2e_harness import TraceProcs

from trace_lite.datasets import Datasets
from trace_lite.dispatcher import open_pool
from trace_lite.users import LocalUserIssuer

ORG = "acme"


def _setup(db_url: str) -> None:
    async def go() -> None:
        pool = await open_pool(db_url, min_size=1, max_size=2)
        try:
            ds = Datasets(pool)
            await ds.ensure_dag(ORG, "chain")
            await ds.set_member(None, ORG, "ann", ["analyst"])
            await ds.set_member(None, ORG, "bob", [])
            await ds.register(ORG, "blocks", dag="chain", job="ingest", read_roles=["analyst"])
            version = await ds.open_version(None, ORG, "blocks")
            await ds.cutover(None, ORG, "chain", {"blocks": version})
        finally:
            await pool.close()

    asyncio.run(go())


@pytest.fixture
def procs(trace_procs: TraceProcs, monkeypatch: pytest.MonkeyPatch) -> TraceProcs:
    _setup(trace_procs.db_url)
    base_env = trace_procs.env
    policy = {"TRACE_USER_JWT_ISSUER": "trace-lite", "TRACE_USER_JWT_AUDIENCE": "trace-api"}
    monkeypatch.setattr(trace_procs, "env", lambda: {**base_env(), **policy})
    trace_procs.start_dispatcher()
    return trace_procs


def _trace_query(t: TraceProcs, subject: str, *args: str) -> subprocess.CompletedProcess[str]:
    token = LocalUserIssuer.init(t.key_dir).token(subject)
    return subprocess.run(
        [sys.executable, "-m", "trace_servers.cli", "query", *args, "--org", ORG],
        env={**t.env(), "TRACE_USER_TOKEN": token},
        capture_output=True,
        text=True,
        timeout=120,
        cwd=t.home,
    )


def test_trace_query_prints_a_table_and_refusals(procs: TraceProcs) -> None:
    sql = (
        "SELECT (SELECT count(*) FROM blocks) AS blocks, 'forty-two' AS answer, "
        "42 AS n UNION ALL SELECT 0, 'x', 7 ORDER BY n"
    )
    r = _trace_query(procs, "ann", sql)
    assert r.returncode == 0, r.stderr + procs.log_tails()
    assert r.stdout.splitlines() == [
        "blocks | answer    |  n",
        "-------+-----------+---",
        "     0 | x         |  7",
        "     0 | forty-two | 42",
        "(2 rows)",
    ]
    r = _trace_query(procs, "ann", "SELECT 1 AS a", "--format", "csv")
    assert (r.returncode, r.stdout) == (0, "a\n1\n")
    # a member without the role: the one message naming nothing
    r = _trace_query(procs, "bob", "SELECT * FROM blocks")
    assert r.returncode == 1
    assert r.stderr.strip() == "error: not_found (sql): dataset not found or not readable"
    # a refused construct through the real server
    r = _trace_query(procs, "ann", "SELECT * FROM read_text('/etc/passwd')")
    assert r.returncode == 1 and "validation_failed (sql)" in r.stderr
    assert "root:" not in r.stdout + r.stderr
    assert procs.scalar("SELECT count(*) FROM dataset_pins") == 0


def test_trace_query_export_status_and_cancel(procs: TraceProcs) -> None:
    """A batch export through the real server: ``--wait`` prints the finished status, whose
    signed URL serves the Parquet result; a slow export is canceled; an ended one answers 409."""
    import io
    import json
    import urllib.request

    import pyarrow.parquet as pq

    sql = "SELECT unnest(range(2500)) AS i, 'x' AS tag"
    r = _trace_query(procs, "ann", "export", sql, "--wait")
    assert r.returncode == 0, r.stderr + procs.log_tails()
    status = json.loads(r.stdout)
    assert (status["state"], status["rows"], status["format"]) == ("succeeded", 2500, "parquet")
    with urllib.request.urlopen(status["url"], timeout=30) as response:
        table = pq.read_table(io.BytesIO(response.read()))
    assert table.num_rows == 2500 and table.column_names == ["i", "tag"]
    r = _trace_query(procs, "ann", "status", status["export_id"])
    assert json.loads(r.stdout)["state"] == "succeeded"
    r = _trace_query(procs, "ann", "cancel", status["export_id"])
    assert r.returncode == 1 and "conflict" in r.stderr
    slow = "SELECT count(*) FROM (SELECT unnest(range(5000)) a), (SELECT unnest(range(5000000)) b)"
    r = _trace_query(procs, "ann", "export", slow)
    running = json.loads(r.stdout)
    assert running["state"] == "running"
    r = _trace_query(procs, "ann", "cancel", running["export_id"])
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["state"] == "canceled"
    # bob sees none of ann's exports
    r = _trace_query(procs, "bob", "status", status["export_id"])
    assert r.returncode == 1 and "not_found" in r.stderr
