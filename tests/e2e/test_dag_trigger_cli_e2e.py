"""``trace dag trigger ORG DAG JOB --payload JSON`` as a user runs it, against a Dispatcher
process on real Postgres: the payload is merged over the job's config into the task a worker
runs; a payload that is not JSON, or not a JSON object, is refused with a message naming
``--payload`` and creates nothing."""

from __future__ import annotations

import json

import pytest
from e2e_harness import WRITE_TABLES, TraceProcs, start_user_stack, trace_cli

ORG = "acme"

FLOW = """\
name: flow
jobs:
  src:
    operator: emit_events
    config: {n: 1, note: from-config}
    triggers:
      - type: manual
    outputs:
      - {storage: object_store, update_strategy: append}
"""


@pytest.fixture
def stack(trace_procs: TraceProcs, monkeypatch: pytest.MonkeyPatch) -> TraceProcs:
    start_user_stack(trace_procs, monkeypatch, ORG, {"dora": ["dag_deployer"]})
    dag_file = trace_procs.home / "flow.yaml"
    dag_file.write_text(FLOW)
    done = trace_cli(trace_procs, "dora", "dag", "deploy", str(dag_file), "--org", ORG)
    assert done.returncode == 0, done.stderr
    return trace_procs


def _written(t: TraceProcs) -> dict[str, int]:
    return {table: int(t.scalar(f"SELECT count(*) FROM {table}")) for table in WRITE_TABLES}


def test_the_task_runs_with_the_payload_merged_over_the_config(stack: TraceProcs) -> None:
    t = stack
    run = trace_cli(t, "dora", "dag", "trigger", ORG, "flow", "src", "--payload", '{"n": 4}')
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["created"] is True and out["job"] == "src"
    payload = t.scalar("SELECT payload FROM tasks WHERE task_id = %s", [out["task_id"]])
    assert payload == {"n": 4, "note": "from-config"}
    t.start_worker(concurrency=2)
    assert t.wait_terminal([out["task_id"]], 60) == {"completed": 1}
    # emit_events ran with n = 4 from the payload (config said 1): four progress events and
    # the final one
    keys = [
        k
        for (k,) in t.sql(
            "SELECT event_key FROM task_events WHERE task_id = %s ORDER BY 1", [out["task_id"]]
        )
    ]
    assert keys == ["done", "progress-0", "progress-1", "progress-2", "progress-3"]


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ("{n: 4}", "--payload is not JSON"),
        ("", "--payload is not JSON"),
        ("[1, 2]", "--payload must be a JSON object"),
        ('"n=4"', "--payload must be a JSON object"),
        ("4", "--payload must be a JSON object"),
        ("null", "--payload must be a JSON object"),
    ],
    ids=["not-json", "empty", "array", "string", "number", "null"],
)
def test_a_bad_payload_is_refused_and_creates_nothing(
    stack: TraceProcs, payload: str, message: str
) -> None:
    t = stack
    before = _written(t)
    run = trace_cli(t, "dora", "dag", "trigger", ORG, "flow", "src", "--payload", payload)
    assert run.returncode != 0
    assert message in run.stderr, run.stderr
    assert "Traceback" not in run.stderr
    assert _written(t) == before
