"""Slot secrets never appear in logs, rows, events or errors, with real processes: a Dispatcher
and ``trace worker`` processes run pooled DAG jobs whose slots carry ``secret_env`` (secrets in
the org's namespace of the Lite SecretStore). The secret reaches the attempt (a child process
the built-in ``spawn_env`` operator starts sees the variable), attempts fail and are retried in
slots holding secrets, and a slot naming a missing secret fails its attempt; then every process
log (worker and Dispatcher, from their first line) and every table of the state database is
searched for the secret values: none is found, and the missing secret's error names only it."""

from __future__ import annotations

from typing import Any

import pytest
from e2e_harness import TraceProcs, start_user_stack, trace_cli
from secret_checks import assert_no_secret_anywhere, put_secrets

ORG = "acme"
SECRETS = {"rpc/key-a": "v4lue-of-a-0c1b7e93d2", "rpc/key-b": "v4lue-of-b-f61a28c4b5"}

KEYED = """\
name: keyed
worker_pools:
  rpc:
    - env: {CHAIN: a}
      secret_env: {RPC_KEY: rpc/key-a}
    - env: {CHAIN: b}
      secret_env: {RPC_KEY: rpc/key-b}
  broken:
    - secret_env: {RPC_KEY: rpc/not-stored}
jobs:
  src:
    operator: emit_events
    config: {n: 3}
    triggers:
      - type: manual
    outputs:
      - {storage: object_store, update_strategy: append}
  look:
    operator: spawn_env
    worker_pool: rpc
    inputs:
      - from: {job: src}
  fails:
    operator: fail_always
    worker_pool: rpc
    max_attempts: 2
    inputs:
      - from: {job: src}
  nokey:
    operator: noop
    worker_pool: broken
    max_attempts: 1
    inputs:
      - from: {job: src}
"""
EVENTS = 4  # emit_events with n = 3: three progress events and a final one


@pytest.fixture
def stack(trace_procs: TraceProcs, monkeypatch: pytest.MonkeyPatch) -> TraceProcs:
    start_user_stack(trace_procs, monkeypatch, ORG, {"dora": ["dag_deployer"]})
    put_secrets(trace_procs, ORG, SECRETS)
    return trace_procs


def test_slot_secrets_are_in_no_log_row_event_or_error(stack: TraceProcs) -> None:
    t = stack
    dag_file = t.home / "keyed.yaml"
    dag_file.write_text(KEYED)
    done = trace_cli(t, "dora", "dag", "deploy", str(dag_file), "--org", ORG)
    assert done.returncode == 0, done.stderr
    t.start_worker(concurrency=4)
    t.start_worker(concurrency=4)
    run = trace_cli(t, "dora", "dag", "trigger", ORG, "keyed", "src", "--run-id", "r1")
    assert run.returncode == 0, run.stderr

    def settled() -> list[tuple[Any, ...]] | None:
        rows = t.sql(
            "SELECT dag_job, state, count(*) FROM tasks GROUP BY dag_job, state ORDER BY dag_job"
        )
        want = [("fails", "failed", EVENTS), ("look", "completed", EVENTS)]
        want += [("nokey", "failed", EVENTS), ("src", "completed", 1)]
        return rows if rows == want else None

    t.wait_until(settled, 120, "every task of the DAG to end")

    # the secret reached each attempt: the child process spawn_env started saw the variables
    for (result,) in t.sql("SELECT result FROM tasks WHERE dag_job = 'look'"):
        assert result["exit_code"] == 0
        assert {"CHAIN", "RPC_KEY"} <= set(result["child_env"])
        assert result["worker_has_platform_token"] is False
    # a retried failure in a secret-holding slot: two attempts each, errors recorded
    assert t.sql(
        "SELECT count(*) FROM task_attempts a JOIN tasks t USING (task_id) "
        "WHERE t.dag_job = 'fails' AND a.outcome = 'failed'"
    ) == [(2 * EVENTS,)]
    # the missing secret's error names the secret and the variable, and nothing else of it
    for (message,) in t.sql("SELECT error ->> 'message' FROM tasks WHERE dag_job = 'nokey'"):
        assert "rpc/not-stored" in message and "RPC_KEY" in message, message
    logs = "".join(p.read_text(errors="replace") for p in sorted(t.log_dir.iterdir()))
    assert "dispatcher listening" in logs and "worker started" in logs  # real, complete logs
    assert_no_secret_anywhere(t, list(SECRETS.values()))
