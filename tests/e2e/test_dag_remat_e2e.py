"""Rematerialization with real processes: ``trace dag deploy`` of a config edit stages the new
version (the old one stays active), ``trace dag status`` shows the rebuild, the worker runs
the rebuild, the running Dispatcher's cutover pass makes the new version and its pointer set
live, and an event announced during the rebuild is processed once, after the cutover."""

from __future__ import annotations

from typing import Any

import pytest
from e2e_harness import TraceProcs, start_user_stack, trace_cli

ORG = "acme"

FLOW = """\
name: flow
jobs:
  src:
    operator: emit_events
    config: {{n: 2}}
    triggers:
      - type: manual
    outputs:
      - {{storage: object_store, update_strategy: append}}
  mid:
    operator: {mid}
    config: {{rule: {rule}, seconds: 0.2}}
    inputs:
      - from: {{job: src}}
    outputs:
      - {{storage: object_store, update_strategy: append}}
  side:
    operator: noop
    inputs:
      - from: {{job: src}}
"""


@pytest.fixture
def stack(trace_procs: TraceProcs, monkeypatch: pytest.MonkeyPatch) -> TraceProcs:
    start_user_stack(trace_procs, monkeypatch, ORG, {"dora": ["dag_deployer"], "bob": []})
    return trace_procs


def _deploy(t: TraceProcs, rule: int, mid: str = "noop") -> str:
    path = t.home / f"flow-{rule}-{mid}.yaml"
    path.write_text(FLOW.format(rule=rule, mid=mid))
    done = trace_cli(t, "dora", "dag", "deploy", str(path), "--org", ORG)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _counts(t: TraceProcs) -> dict[tuple[str, int, str], int]:
    rows = t.sql(
        "SELECT dag_job, dag_version, state, count(*) FROM tasks GROUP BY 1, 2, 3 ORDER BY 1, 2"
    )
    return {(job, version, state): n for job, version, state, n in rows}


def test_a_config_edit_is_rebuilt_and_cut_over(stack: TraceProcs) -> None:
    t = stack
    assert "deployed flow version 1" in _deploy(t, 1)
    t.start_worker(concurrency=4)
    run = trace_cli(t, "dora", "dag", "trigger", ORG, "flow", "src", "--run-id", "r1")
    assert run.returncode == 0, run.stderr

    def all_done(expected: dict[tuple[str, int, str], int]) -> Any:
        def check() -> dict[tuple[str, int, str], int] | None:
            counts = _counts(t)
            return counts if counts == expected else None

        return check

    # src emits 3 events: 3 tasks of mid and of side
    v1 = {("mid", 1, "completed"): 3, ("side", 1, "completed"): 3, ("src", 1, "completed"): 1}
    t.wait_until(all_done(v1), 60, "version 1's run to complete")

    # stop the worker so the rebuild stays visible, then edit mid's config: staged, not live
    (worker,) = t.live("worker")
    t.kill9(worker)
    out = _deploy(t, 2, mid="sleep")
    assert "staged flow version 2: rebuilding mid" in out, out
    assert "version 1 stays active" in out
    assert t.scalar("SELECT active_version FROM dags") == 1
    status = trace_cli(t, "bob", "dag", "status", ORG, "flow")
    assert status.returncode == 0, status.stderr
    assert "rebuilding version 2" in status.stdout, status.stdout
    # a run during the rebuild: side gets it now, mid (rebuilt) waits for the cutover
    run = trace_cli(t, "dora", "dag", "trigger", ORG, "flow", "src", "--run-id", "r2")
    assert run.returncode == 0, run.stderr
    t.start_worker(concurrency=4)
    both = {
        ("mid", 1, "completed"): 3,
        ("mid", 2, "completed"): 6,  # 3 replayed + 3 held, drained after the cutover
        ("side", 1, "completed"): 6,
        ("src", 1, "completed"): 2,
    }
    t.wait_until(all_done(both), 90, "the rebuild, the cutover and the held events")
    assert t.scalar("SELECT active_version FROM dags") == 2
    assert t.scalar("SELECT state FROM dag_rematerializations") == "cut_over"
    assert t.scalar("SELECT reason FROM dag_activations ORDER BY seq DESC LIMIT 1") == "cutover"
    # each held event made one task of the new mid (its key carries the epoch)
    keys = [r[0] for r in t.sql("SELECT idempotency_key FROM tasks WHERE dag_version = 2")]
    assert len(keys) == len(set(keys)) == 6 and all(k.endswith("@2") for k in keys)
