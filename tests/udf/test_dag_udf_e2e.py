"""A DAG of two Python UDFs, end to end over real processes (Dispatcher, UDF runner, sink):
``trace udf deploy`` uploads the bundles; the DAG references them by name and digest; the
source UDF emits rows to a buffered dataset; the sink stores them and its ``rows_committed``
event fans out to the second UDF, which reads the rows through the Query Service (a granted
dataset), emits derived rows and fails its first attempt *after* publishing them -- the retry
re-publishes the same batch keys and every row lands once."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import psycopg

from conftest import UdfProcs
from trace_lite.dag_runs import DagRuns
from trace_lite.dags import Dags
from trace_lite.datasets import table_name
from trace_lite.dispatcher import open_pool
from trace_lite.sink import load_dataset
from trace_servers.dag_cli import builtin_operators

NUMBERS = """
    from trace_udf import Context

    def handler(ctx: Context) -> dict:
        ctx.emit_rows("numbers", [{"n": n} for n in range(ctx.payload["n"])])
        return {"emitted": ctx.payload["n"]}
"""

DOUBLER = """
    from trace_udf import Context

    def handler(ctx: Context) -> dict:
        rows = ctx.query("SELECT n FROM numbers ORDER BY n")
        ctx.emit_rows("doubled", [{"n": r["n"], "doubled": 2 * r["n"]} for r in rows])
        if ctx.event.attempt == 1:  # published, then the answer is refused: attempt 1 fails
            ctx.emit_event("doubled.done", {}, key="not a valid key!")
        return {"read": len(rows), "granted": ctx.datasets}
"""


def _bundle_dir(root: Path, name: str, source: str) -> Path:
    d = root / name
    d.mkdir()
    manifest = {"format": 1, "name": name, "language": "python", "handler": "handler.handler"}
    (d / "trace-udf.json").write_text(json.dumps(manifest))
    (d / "handler.py").write_text(textwrap.dedent(source))
    return d


def _cli(procs: UdfProcs, *argv: str) -> Any:
    out = subprocess.run(
        [sys.executable, "-m", "trace_servers.cli", *argv],
        env=procs.env(),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=procs.home,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _dag(numbers: dict[str, str], doubler: dict[str, str]) -> dict[str, Any]:
    def buffered(schema: dict[str, str]) -> list[dict[str, Any]]:
        return [
            {
                "storage": "postgres_table",
                "update_strategy": "append",
                "buffered": True,
                "unique_key": ["n"],
                "schema": schema,
            }
        ]

    return {
        "name": "udf_e2e",
        "jobs": {
            "numbers": {
                "operator": "udf",
                "runtime": "lambda",
                "config": {"bundle": numbers, "n": 10},
                "triggers": [{"type": "manual"}],
                "outputs": buffered({"n": "int64"}),
            },
            "doubled": {
                "operator": "udf",
                "runtime": "lambda",
                "config": {"bundle": doubler},
                "inputs": [{"from": {"job": "numbers", "output": 0}}],
                "max_attempts": 3,
                "outputs": buffered({"n": "int64", "doubled": "int64"}),
            },
        },
        "publish": [
            {"job": "numbers", "output": 0, "dataset": "numbers"},
            {"job": "doubled", "output": 0, "dataset": "doubled"},
        ],
    }


def test_a_dag_of_python_udfs_reads_a_granted_dataset_and_lands_rows_once(
    udf_procs: UdfProcs, data_db_url: str, tmp_path: Path
) -> None:
    procs = udf_procs
    base_env = procs.env
    procs.env = lambda: {**base_env(), "TRACE_DATA_DATABASE_URL": data_db_url}  # type: ignore[method-assign]
    procs.stop_all()  # restart the Dispatcher with the data database
    procs.procs.clear()
    procs.start_dispatcher()
    procs.start_runner()
    sink = procs._spawn("sink", "sink", "run", "--org", "default")
    procs.wait_until(lambda: "running" in sink.log_path.read_text(), 60, "the sink started")

    src = tmp_path / "udfs"
    src.mkdir()
    numbers = _cli(procs, "udf", "deploy", str(_bundle_dir(src, "numbers", NUMBERS)))
    doubler = _cli(procs, "udf", "deploy", str(_bundle_dir(src, "doubler", DOUBLER)))
    assert numbers["job"]["config"]["bundle"]["digest"] == numbers["digest"]
    refs = [{"name": b["name"], "digest": b["digest"]} for b in (numbers, doubler)]

    async def deploy_and_trigger() -> None:
        pool = await open_pool(procs.db_url, min_size=1, max_size=2)
        try:
            await Dags(pool, operators=builtin_operators()).deploy(None, "default", _dag(*refs))
            await DagRuns(pool).trigger(None, "default", "udf_e2e", "numbers")
        finally:
            await pool.close()

    asyncio.run(deploy_and_trigger())

    def doubled_task() -> list[tuple[Any, ...]]:
        return procs.sql(
            "SELECT task_id::text, state FROM tasks WHERE dag_job = 'doubled' AND state = 'completed'"
        )

    [(task_id, _)] = procs.wait_until(doubled_task, 120, "the doubled task to complete")
    attempts = procs.sql(
        "SELECT attempt, outcome, error->>'code' FROM task_attempts WHERE task_id = %s "
        "ORDER BY attempt",
        (task_id,),
    )
    assert attempts == [(1, "failed", "udf_invalid_response"), (2, "succeeded", None)]
    result = procs.scalar("SELECT result FROM tasks WHERE task_id = %s", (task_id,))
    assert result == {"read": 10, "granted": ["numbers"]}
    # attempt 1 published the batch; attempt 2's publish of the same key was a no-op
    batches = procs.sql(
        "SELECT batch_key, attempt, row_count FROM buffer_batches WHERE task_id = %s", (task_id,)
    )
    assert batches == [("doubled.0.0", 1, 10)]

    async def table() -> str:
        pool = await open_pool(procs.db_url, min_size=1, max_size=2)
        try:
            ds = await load_dataset(pool, "default", "doubled")
            assert ds.dataset_version is not None
            return table_name(ds.dataset_version)
        finally:
            await pool.close()

    name = asyncio.run(table())

    def stored() -> list[tuple[Any, ...]]:
        with psycopg.connect(data_db_url, autocommit=True) as conn:
            return conn.execute(f"SELECT n, doubled FROM {name} ORDER BY n").fetchall()

    procs.wait_until(lambda: len(stored()) == 10, 60, "the doubled rows in the data table")
    assert stored() == [(n, 2 * n) for n in range(10)]
    health = procs.runner_health()
    assert health["succeeded"] == 2 and health["failed"] == 1
