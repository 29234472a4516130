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

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from udf_lang_fakes import CARGO, build_node_bundle, build_node_sdk, build_rust_bundle, write_files

from conftest import UdfProcs, buffered_output

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
                "outputs": buffered_output({"i": "int64", "sq": "int64", "base": "int64"}, ["i"]),
            },
            "sums_node": {
                "operator": "udf",
                "runtime": "lambda",
                "config": {"bundle": sums_node},
                "inputs": [reader],
                "max_attempts": 3,
                "outputs": buffered_output(sums, ["i"]),
            },
            "sums_rust": {
                "operator": "udf",
                "runtime": "lambda",
                "config": {"bundle": sums_rust, "mode": "reader", "output": "sums_rust"},
                "inputs": [reader],
                "max_attempts": 3,
                "outputs": buffered_output(sums, ["i"]),
            },
        },
        "publish": [
            {"job": "squares", "output": 0, "dataset": "squares"},
            {"job": "sums_node", "output": 0, "dataset": "sums_node"},
            {"job": "sums_rust", "output": 0, "dataset": "sums_rust"},
        ],
    }


def test_a_dag_of_rust_and_node_udfs_reads_a_granted_dataset_and_lands_rows_once(
    udf_dag_procs: UdfProcs, tmp_path: Path
) -> None:
    procs = udf_dag_procs
    build_node_sdk()
    node_src = write_files(tmp_path / "sums-node-src", {"handler.ts": SUMS_NODE})
    bundles = {
        "squares": build_rust_bundle(tmp_path / "squares", name="squares-rs"),
        "sums_node": build_node_bundle(node_src, tmp_path / "sums-node", name="sums-node"),
        "sums_rust": build_rust_bundle(
            tmp_path / "sums-rust", name="sums-rs", example="conformance"
        ),
    }
    refs = {job: procs.deploy_bundle(path) for job, path in bundles.items()}
    procs.deploy_and_trigger(_dag(refs["squares"], refs["sums_node"], refs["sums_rust"]), "squares")

    for job in ("sums_node", "sums_rust"):
        [task_id] = procs.wait_until(
            lambda j=job: procs.completed_tasks(j), 120, f"{job} to complete"
        )
        assert procs.attempts(task_id) == [
            (1, "failed", "udf_invalid_response"),
            (2, "succeeded", None),
        ], job
        result = procs.scalar("SELECT result FROM tasks WHERE task_id = %s", (task_id,))
        assert result == {"read": 10, "granted": ["squares"]}, job
        # attempt 1 published the batch; attempt 2's publish of the same key was a no-op
        assert procs.buffer_batches(task_id) == [(f"{job}.0.0", 1, 10)], job

    [squares_task] = procs.completed_tasks("squares")
    assert procs.scalar("SELECT result FROM tasks WHERE task_id = %s", (squares_task,)) == {
        "emitted": 10,
        "base": 0,
        "attempt": 1,
    }

    def stored(dataset: str) -> list[tuple[Any, ...]]:
        return procs.stored_rows(dataset, ["i", "total"])

    for dataset in ("sums_node", "sums_rust"):
        procs.wait_until(lambda d=dataset: len(stored(d)) == 10, 60, f"{dataset} rows stored")
        assert stored(dataset) == [(i, i + i * i) for i in range(10)]
    health = procs.runner_health()
    assert health["succeeded"] == 3 and health["failed"] == 2
