"""A DAG of two Python UDFs, end to end over real processes (Dispatcher, UDF runner, sink):
``trace udf deploy`` uploads the bundles; the DAG references them by name and digest; the
source UDF emits rows to a buffered dataset; the sink stores them and its ``rows_committed``
event fans out to the second UDF, which reads the rows through the Query Service (a granted
dataset), emits derived rows and fails its first attempt *after* publishing them -- the retry
re-publishes the same batch keys and every row lands once."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

from conftest import UdfProcs, buffered_output

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


def _dag(numbers: dict[str, str], doubler: dict[str, str]) -> dict[str, Any]:
    return {
        "name": "udf_e2e",
        "jobs": {
            "numbers": {
                "operator": "udf",
                "runtime": "lambda",
                "config": {"bundle": numbers, "n": 10},
                "triggers": [{"type": "manual"}],
                "outputs": buffered_output({"n": "int64"}, ["n"]),
            },
            "doubled": {
                "operator": "udf",
                "runtime": "lambda",
                "config": {"bundle": doubler},
                "inputs": [{"from": {"job": "numbers", "output": 0}}],
                "max_attempts": 3,
                "outputs": buffered_output({"n": "int64", "doubled": "int64"}, ["n"]),
            },
        },
        "publish": [
            {"job": "numbers", "output": 0, "dataset": "numbers"},
            {"job": "doubled", "output": 0, "dataset": "doubled"},
        ],
    }


def test_a_dag_of_python_udfs_reads_a_granted_dataset_and_lands_rows_once(
    udf_dag_procs: UdfProcs, tmp_path: Path
) -> None:
    procs = udf_dag_procs
    src = tmp_path / "udfs"
    src.mkdir()
    numbers = procs.deploy_bundle(_bundle_dir(src, "numbers", NUMBERS))
    doubler = procs.deploy_bundle(_bundle_dir(src, "doubler", DOUBLER))
    procs.deploy_and_trigger(_dag(numbers, doubler), "numbers")

    [task_id] = procs.wait_until(
        lambda: procs.completed_tasks("doubled"), 120, "the doubled task to complete"
    )
    assert procs.attempts(task_id) == [
        (1, "failed", "udf_invalid_response"),
        (2, "succeeded", None),
    ]
    result = procs.scalar("SELECT result FROM tasks WHERE task_id = %s", (task_id,))
    assert result == {"read": 10, "granted": ["numbers"]}
    # attempt 1 published the batch; attempt 2's publish of the same key was a no-op
    assert procs.buffer_batches(task_id) == [("doubled.0.0", 1, 10)]

    def stored() -> list[tuple[Any, ...]]:
        return procs.stored_rows("doubled", ["n", "doubled"])

    procs.wait_until(lambda: len(stored()) == 10, 60, "the doubled rows in the data table")
    assert stored() == [(n, 2 * n) for n in range(10)]
    health = procs.runner_health()
    assert health["succeeded"] == 2 and health["failed"] == 1
