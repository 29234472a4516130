"""``trace dag status``, ``trace dag cancel`` and ``trace dag rollback`` against a running
Dispatcher process (no worker: triggered runs stay queued): status counts per job with a
progress bar, a run canceled, a rollback restores version 1 and cancels version 2's queued
work, and a second rollback is refused with nothing changed."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest
from e2e_harness import TraceProcs

from trace_lite.datasets import Datasets
from trace_lite.dispatcher import open_pool
from trace_lite.users import LocalUserIssuer

ORG = "acme"
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "dags" / "blocks.yaml"


def _members(db_url: str) -> None:
    async def go() -> None:
        pool = await open_pool(db_url, min_size=1, max_size=2)
        try:
            ds = Datasets(pool)
            await ds.set_member(None, ORG, "dora", ["dag_deployer"])
            await ds.set_member(None, ORG, "bob", [])
        finally:
            await pool.close()

    asyncio.run(go())


@pytest.fixture
def stack(trace_procs: TraceProcs, monkeypatch: pytest.MonkeyPatch) -> TraceProcs:
    _members(trace_procs.db_url)
    base_env = trace_procs.env
    policy = {"TRACE_USER_JWT_ISSUER": "trace-lite", "TRACE_USER_JWT_AUDIENCE": "trace-api"}
    monkeypatch.setattr(trace_procs, "env", lambda: {**base_env(), **policy})
    trace_procs.start_dispatcher()
    return trace_procs


def trace(t: TraceProcs, subject: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``trace ARGS`` as a user would run it, with ``subject``'s user token."""
    env = {**t.env(), "TRACE_USER_TOKEN": LocalUserIssuer.init(t.key_dir).token(subject)}
    return subprocess.run(
        [sys.executable, "-m", "trace_servers.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=t.home,
    )


def test_status_cancel_and_rollback_from_the_cli(stack: TraceProcs) -> None:
    t = stack
    # The example without its interval trigger: only the runs this test triggers exist.
    text = EXAMPLE.read_text().replace("      - type: interval\n        every: 5m\n", "")
    v1, v2 = t.home / "v1.yaml", t.home / "v2.yaml"
    v1.write_text(text)
    v2.write_text(text.replace("config: {n: 3}", "config: {n: 4}"))
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
