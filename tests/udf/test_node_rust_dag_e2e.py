"""One DAG mixing Rust and Node UDF bundles, end to end over real processes (Dispatcher, Lite UDF
runner, sink): the bundles are built by each SDK's own tooling (``cargo build --offline``;
``sdks/node/build.mjs``) and deployed with ``trace udf deploy``; the DAG references them by name
and digest.

* ``squares`` (Rust, the crate's ``bootstrap`` example) emits 10 rows to a buffered dataset;
* the sink stores them and its ``rows_committed`` event fans out to ``sums_node`` (a TypeScript
  handler) and ``sums_rust`` (the Rust ``conformance`` example, mode ``reader``); each reads
  ``squares`` through the Query Service (a granted dataset), emits derived rows, and on its first
  attempt answers a result too deep to store *after* its rows were published: the runner fails
  that attempt ``udf_invalid_response``, the retry re-publishes the same batch keys (no-ops) and
  every row lands once.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest
from udf_lang_fakes import CARGO, build_node_bundle, build_node_sdk, build_rust_bundle, write_files

from conftest import UdfProcs
from trace_lite.dag_runs import DagRuns
from trace_lite.dags import Dags
from trace_lite.datasets import table_name
from trace_lite.dispatcher import open_pool
from trace_lite.sink import load_dataset
from trace_servers.dag_cli import builtin_operators

pytestmark = [
    pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed"),
    pytest.mark.skipif(not os.access(CARGO, os.X_OK), reason=f"cargo is not installed ({CARGO})"),
]

SUMS_NODE = """
import type { Handler, JsonObject } from "@trace/udf";

export const handler: Handler = async (ctx) => {
  const rows = await ctx.query("SELECT i, sq FROM squares ORDER BY i");
  ctx.emitRows("sums_node", rows.map((r) => ({ i: r.i, total: Number(r.i) + Number(r.sq) })));
  if (ctx.event.attempt === 1) {
    let deep: JsonObject = {};
    for (let k = 0; k < 80; k++) deep = { d: deep };
    return deep; // published, then the answer is refused: attempt 1 fails
  }
  return { read: rows.length, granted: ctx.datasets };
};
"""


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


def _buffered(schema: dict[str, str]) -> list[dict[str, Any]]:
    return [
        {
            "storage": "postgres_table",
            "update_strategy": "append",
            "buffered": True,
            "unique_key": ["i"],
            "schema": schema,
        }
    ]


def _dag(squares: dict[str, str], sums_node: dict[str, str], sums_rust: dict[str, str]) -> Any:
    sums = {"i": "int64", "total": "int64"}
    reader = {"from": {"job": "squares", "output": 0}}
    return {
        "name": "mixed_udfs",
        "jobs": {
            "squares": {
                "operator": "udf",
                "runtime": "lambda",
                "config": {"bundle": squares, "n": 10, "output": "squares"},
                "triggers": [{"type": "manual"}],
                "outputs": _buffered({"i": "int64", "sq": "int64", "base": "int64"}),
            },
            "sums_node": {
                "operator": "udf",
                "runtime": "lambda",
                "config": {"bundle": sums_node},
                "inputs": [reader],
                "max_attempts": 3,
                "outputs": _buffered(sums),
            },
            "sums_rust": {
                "operator": "udf",
                "runtime": "lambda",
                "config": {"bundle": sums_rust, "mode": "reader", "output": "sums_rust"},
                "inputs": [reader],
                "max_attempts": 3,
                "outputs": _buffered(sums),
            },
        },
        "publish": [
            {"job": "squares", "output": 0, "dataset": "squares"},
            {"job": "sums_node", "output": 0, "dataset": "sums_node"},
            {"job": "sums_rust", "output": 0, "dataset": "sums_rust"},
        ],
    }


def test_a_dag_of_rust_and_node_udfs_reads_a_granted_dataset_and_lands_rows_once(
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

    build_node_sdk()
    node_src = write_files(tmp_path / "sums-node-src", {"handler.ts": SUMS_NODE})
    bundles = {
        "squares": build_rust_bundle(tmp_path / "squares", name="squares-rs"),
        "sums_node": build_node_bundle(node_src, tmp_path / "sums-node", name="sums-node"),
        "sums_rust": build_rust_bundle(
            tmp_path / "sums-rust", name="sums-rs", example="conformance"
        ),
    }
    deployed = {job: _cli(procs, "udf", "deploy", str(path)) for job, path in bundles.items()}
    refs = {job: {"name": d["name"], "digest": d["digest"]} for job, d in deployed.items()}

    async def deploy_and_trigger() -> None:
        pool = await open_pool(procs.db_url, min_size=1, max_size=2)
        try:
            dag = _dag(refs["squares"], refs["sums_node"], refs["sums_rust"])
            await Dags(pool, operators=builtin_operators()).deploy(None, "default", dag)
            await DagRuns(pool).trigger(None, "default", "mixed_udfs", "squares")
        finally:
            await pool.close()

    asyncio.run(deploy_and_trigger())

    def completed(job: str) -> list[tuple[Any, ...]]:
        return procs.sql(
            "SELECT task_id::text FROM tasks WHERE dag_job = %s AND state = 'completed'", (job,)
        )

    for job in ("sums_node", "sums_rust"):
        [(task_id,)] = procs.wait_until(lambda j=job: completed(j), 120, f"{job} to complete")
        attempts = procs.sql(
            "SELECT attempt, outcome, error->>'code' FROM task_attempts WHERE task_id = %s "
            "ORDER BY attempt",
            (task_id,),
        )
        assert attempts == [(1, "failed", "udf_invalid_response"), (2, "succeeded", None)], job
        result = procs.scalar("SELECT result FROM tasks WHERE task_id = %s", (task_id,))
        assert result == {"read": 10, "granted": ["squares"]}, job
        # attempt 1 published the batch; attempt 2's publish of the same key was a no-op
        batches = procs.sql(
            "SELECT batch_key, attempt, row_count FROM buffer_batches WHERE task_id = %s",
            (task_id,),
        )
        assert batches == [(f"{job}.0.0", 1, 10)], job

    [(squares_task,)] = completed("squares")
    assert procs.scalar("SELECT result FROM tasks WHERE task_id = %s", (squares_task,)) == {
        "emitted": 10,
        "base": 0,
        "attempt": 1,
    }

    async def table(dataset: str) -> str:
        pool = await open_pool(procs.db_url, min_size=1, max_size=2)
        try:
            ds = await load_dataset(pool, "default", dataset)
            assert ds.dataset_version is not None
            return table_name(ds.dataset_version)
        finally:
            await pool.close()

    def stored(dataset: str) -> list[tuple[Any, ...]]:
        name = asyncio.run(table(dataset))
        with psycopg.connect(data_db_url, autocommit=True) as conn:
            return conn.execute(f"SELECT i, total FROM {name} ORDER BY i").fetchall()

    for dataset in ("sums_node", "sums_rust"):
        procs.wait_until(lambda d=dataset: len(stored(d)) == 10, 60, f"{dataset} rows stored")
        assert stored(dataset) == [(i, i + i * i) for i in range(10)]
    health = procs.runner_health()
    assert health["succeeded"] == 3 and health["failed"] == 2
