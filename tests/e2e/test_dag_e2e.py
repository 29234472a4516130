"""The example DAG end to end with real processes: ``trace dag deploy`` of
``examples/dags/blocks.yaml`` against a running Dispatcher, ``trace dag trigger``, a worker
runs the source and the tasks its events fan out to, and ``trace datasets resolve`` finds the
published dataset's committed object."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from e2e_harness import TraceProcs, start_user_stack, trace_cli

from trace_lite.secrets import FileSecretStore

ORG = "acme"
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "dags" / "blocks.yaml"


@pytest.fixture
def stack(trace_procs: TraceProcs, monkeypatch: pytest.MonkeyPatch) -> TraceProcs:
    """A Dispatcher checking user tokens; dora deploys DAGs of the org, bob is a member."""
    start_user_stack(trace_procs, monkeypatch, ORG, {"dora": ["dag_deployer"], "bob": []})
    return trace_procs


trace = trace_cli


def test_example_dag_deploys_runs_and_its_dataset_resolves(stack: TraceProcs) -> None:
    t = stack
    refused = trace(t, "bob", "dag", "deploy", str(EXAMPLE), "--org", ORG)
    assert refused.returncode == 1 and "forbidden" in refused.stderr, refused
    # the server's problems, printed with the file's line numbers; nothing deployed
    bad = t.home / "bad.yaml"
    bad.write_text(EXAMPLE.read_text().replace("operator: stage_output", "operator: stage_it"))
    line = bad.read_text().splitlines().index("    operator: stage_it") + 1
    refused = trace(t, "dora", "dag", "deploy", str(bad), "--org", ORG)
    assert refused.returncode == 1
    assert f"bad.yaml:{line}: jobs.blocks.operator: " in refused.stderr, refused.stderr
    assert t.scalar("SELECT count(*) FROM dag_versions") == 0
    preview = trace(t, "dora", "dag", "diff", str(EXAMPLE), "--org", ORG)
    assert preview.returncode == 0, preview.stderr
    assert "rebuild: blocks, ranges" in preview.stdout
    done = trace(t, "dora", "dag", "deploy", str(EXAMPLE), "--org", ORG)
    assert done.returncode == 0, done.stderr
    assert "deployed blocks_demo version 1" in done.stdout
    again = trace(t, "dora", "dag", "deploy", str(EXAMPLE), "--org", ORG)
    assert "unchanged: version 1 stays active" in again.stdout, again
    listed = json.loads(trace(t, "bob", "dag", "list", "--org", ORG).stdout)
    assert [(d["name"], d["active_version"]) for d in listed["dags"]] == [("blocks_demo", 1)]

    # the example's pool slots name secrets: the worker resolves them from Lite's SecretStore
    org_id = t.scalar("SELECT org_id::text FROM orgs WHERE name = %s", (ORG,))
    secrets = FileSecretStore(t.trace_dir / "secrets" / "store")
    for n in (1, 2):
        asyncio.run(secrets.put(f"trace/org/{org_id}/rpc/key-{n}", f"value-{n}".encode()))
    # one worker at a time: every task of `blocks` stages the same range of a replace dataset
    t.start_worker(concurrency=1)
    run = trace(t, "dora", "dag", "trigger", ORG, "blocks_demo", "ranges", "--run-id", "r1")
    assert run.returncode == 0, run.stderr
    source = json.loads(run.stdout)
    assert source["created"] is True

    # ranges emits 3 progress events and a final one: 4 tasks of `blocks`, each completed
    def finished() -> list[tuple[Any, ...]] | None:
        rows = t.sql(
            "SELECT dag_job, state FROM tasks WHERE dag_job IS NOT NULL ORDER BY dag_job, state"
        )
        states = [r for r in rows if r[0] == "blocks"]
        done = len(states) == 4 and all(s == "completed" for _, s in states)
        return rows if done else None

    rows = t.wait_until(finished, 60, "the DAG's tasks to complete")
    assert rows.count(("ranges", "completed")) == 1
    logged = "".join(p.read_text() for p in t.log_dir.glob("*.log"))
    assert "worker started" in logged and "value-1" not in logged and "value-2" not in logged
    # a second trigger of the same run is the same task: nothing runs again
    rerun = json.loads(
        trace(t, "dora", "dag", "trigger", ORG, "blocks_demo", "ranges", "--run-id", "r1").stdout
    )
    assert (rerun["task_id"], rerun["created"]) == (source["task_id"], False)
    assert t.scalar("SELECT count(*) FROM task_inputs") == 4

    def resolved() -> dict[str, Any] | None:
        out = trace(t, "dora", "datasets", "resolve", "blocks", "--org", ORG)
        assert out.returncode == 0, out.stderr
        body: dict[str, Any] = json.loads(out.stdout)
        (ds,) = body["datasets"]
        return ds if ds["objects"] else None

    ds = t.wait_until(resolved, 30, "the published dataset to resolve to a promoted object")
    assert ds["dataset"] == "blocks" and ds["dataset_version"]
    (obj,) = ds["objects"]
    committed = json.loads(t.read_object(obj["object_key"]))
    assert committed["blocks"] == [0, 100]
    assert (
        t.scalar(
            "SELECT count(*) FROM tasks WHERE dag_job = 'blocks' AND task_id::text = %s",
            (committed["task_id"],),
        )
        == 1
    )


TICKER = """\
name: ticker
jobs:
  tick:
    operator: noop
    triggers:
      - type: interval
        every: 1s
"""


def test_interval_schedule_survives_a_killed_dispatcher(stack: TraceProcs) -> None:
    """A running Dispatcher fires each slot of an interval trigger once, as the run
    ``ticker:tick:{slot}``; after kill -9 and a restart the slots go on, none fired twice."""
    t = stack
    dag_file = t.home / "ticker.yaml"
    dag_file.write_text(TICKER)
    done = trace(t, "dora", "dag", "deploy", str(dag_file), "--org", ORG)
    assert done.returncode == 0, done.stderr
    t.start_worker(concurrency=2)

    def ticks(at_least: int) -> list[str] | None:
        keys = [r[0] for r in t.sql("SELECT idempotency_key FROM tasks WHERE dag_job = 'tick'")]
        return keys if len(keys) >= at_least else None

    before = t.wait_until(lambda: ticks(2), 30, "two interval slots to fire")
    (dispatcher,) = t.live("dispatcher")
    t.kill9(dispatcher)
    t.start_dispatcher()
    after = t.wait_until(lambda: ticks(len(before) + 2), 30, "slots to fire after the restart")
    slots = []
    for key in after:
        assert key.startswith("ticker:tick:"), key
        slot = datetime.fromisoformat(key.removeprefix("ticker:tick:"))
        assert slot.microsecond == 0 and slot.tzinfo is not None
        slots.append(slot)
    assert len(set(slots)) == len(slots)  # one task per slot
    (deployed,) = t.sql("SELECT created_at FROM dag_versions")
    assert min(slots) >= deployed[0].replace(microsecond=0)
    t.wait_until(
        lambda: (
            t.scalar("SELECT count(*) FROM tasks WHERE dag_job = 'tick' AND state = 'completed'")
            >= len(before)
        ),
        30,
        "the ticks to run",
    )
