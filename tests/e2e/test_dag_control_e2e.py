"""``trace dag status``, ``trace dag cancel`` and ``trace dag rollback`` against a running
Dispatcher process (no worker: triggered runs stay queued): status counts per job with a
progress bar, a run canceled, a rollback restores version 1 and cancels version 2's queued
work, and a second rollback is refused with nothing changed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from e2e_harness import TraceProcs, start_user_stack, trace_cli

ORG = "acme"
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "dags" / "blocks.yaml"


@pytest.fixture
def stack(trace_procs: TraceProcs, monkeypatch: pytest.MonkeyPatch) -> TraceProcs:
    """A Dispatcher checking user tokens; dora deploys DAGs of the org, bob is a member."""
    start_user_stack(trace_procs, monkeypatch, ORG, {"dora": ["dag_deployer"], "bob": []})
    return trace_procs


trace = trace_cli


def test_status_cancel_and_rollback_from_the_cli(stack: TraceProcs) -> None:
    t = stack
    # The example without its interval trigger: only the runs this test triggers exist.
    text = EXAMPLE.read_text().replace("      - type: interval\n        every: 5m\n", "")
    v1, v2 = t.home / "v1.yaml", t.home / "v2.yaml"
    v1.write_text(text)
    # an execution-only edit: version 2 goes live at once (a config edit would be rebuilt first)
    v2.write_text(text.replace("timeout: 30s", "timeout: 20s"))
    for f in (v1, v2):
        done = trace(t, "dora", "dag", "deploy", str(f), "--org", ORG)
        assert done.returncode == 0, done.stderr
    for run in ("r1", "r2"):
        out = trace(t, "dora", "dag", "trigger", ORG, "blocks_demo", "ranges", "--run-id", run)
        assert out.returncode == 0, out.stderr

    status = trace(t, "bob", "dag", "status", ORG, "blocks_demo")
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    assert lines[0].startswith("blocks_demo: active version 2, pointer set ")
    assert any(
        line.split()[0] == "ranges" and "0/2" in line and "queued 2" in line for line in lines
    )
    assert any(line.split()[0] == "blocks" and "no tasks" in line for line in lines)

    refused = trace(t, "bob", "dag", "cancel", ORG, "blocks_demo", "--run", "r1")
    assert refused.returncode == 1 and "forbidden" in refused.stderr
    canceled = trace(t, "dora", "dag", "cancel", ORG, "blocks_demo", "--run", "r1")
    assert canceled.returncode == 0, canceled.stderr
    assert json.loads(canceled.stdout)["canceled"] == {"queued": 1}
    body = json.loads(trace(t, "bob", "dag", "status", ORG, "blocks_demo", "--json").stdout)
    assert body["jobs"]["ranges"]["queued"] == 1 and body["jobs"]["ranges"]["canceled"] == 1

    rolled = trace(t, "dora", "dag", "rollback", ORG, "blocks_demo")
    assert rolled.returncode == 0, rolled.stderr
    out = json.loads(rolled.stdout)
    assert (out["from_version"], out["version"], out["canceled"]) == (2, 1, {"queued": 1})
    assert t.scalar("SELECT active_version FROM dags") == 1
    assert t.scalar("SELECT count(*) FROM tasks WHERE state <> 'canceled'") == 0
    again = trace(t, "dora", "dag", "rollback", ORG, "blocks_demo")
    assert again.returncode == 1 and "conflict" in again.stderr
    assert t.scalar("SELECT active_version FROM dags") == 1
    version = trace(t, "dora", "dag", "cancel", ORG, "blocks_demo", "--version", "2")
    assert version.returncode == 0 and json.loads(version.stdout)["canceled"] == {}
