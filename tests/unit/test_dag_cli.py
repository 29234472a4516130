"""``trace dag validate|diff|schema`` as a user runs them: a real subprocess, exit codes and
output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "dags" / "blocks.yaml"


def trace(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trace_servers.cli", "dag", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


def test_validate_accepts_the_example() -> None:
    done = trace("validate", EXAMPLE)
    assert done.returncode == 0, done.stderr
    assert "ok (DAG 'blocks_demo': 2 job(s), 1 published dataset(s))" in done.stdout


def test_validate_lists_every_problem_with_line_path_and_hint(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "name: d\n"
        "jobs:\n"
        "  src: {operator: emit_event, triggers: [{type: manual}]}\n"
        "  b: {operator: noop, inputs: [{from: {job: srcc}}], execution_strategy: Bulk}\n"
    )
    done = trace("validate", bad)
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    assert lines == [
        f"{bad}:4: jobs.b.execution_strategy: execution_strategy: Bulk is not supported: one "
        "event runs one task (hint: batch explicitly: put a range_aggregator job before this "
        "one (and a range_splitter to split ranges back))",
        f"{bad}:3: jobs.src.operator: unknown operator 'emit_event' (hint: did you mean "
        "'emit_events'?)",
        f"{bad}:4: jobs.b.inputs[0].from.job: no job named 'srcc' (hint: did you mean 'src'?)",
        f"{bad}: 3 problem(s)",
    ]
    as_json = trace("validate", bad, "--json")
    assert as_json.returncode == 1
    body = json.loads(as_json.stdout)
    assert [p["path"] for p in body["problems"]] == [
        "jobs.b.execution_strategy",
        "jobs.src.operator",
        "jobs.b.inputs[0].from.job",
    ]


def test_validate_refuses_a_missing_file(tmp_path: Path) -> None:
    done = trace("validate", tmp_path / "nope.yaml")
    assert done.returncode == 1
    assert "cannot read" in done.stderr


def test_diff_classifies_and_names_the_rebuild(tmp_path: Path) -> None:
    text = EXAMPLE.read_text()
    new = tmp_path / "new.yaml"
    new.write_text(
        text.replace("where: {start: {gte: 0}}", "where: {start: {gte: 100}}").replace(
            "    timeout: 30s", "    timeout: 45s"
        )
    )
    done = trace("diff", EXAMPLE, new)
    assert done.returncode == 0, done.stderr
    out = done.stdout.splitlines()
    assert out[0].split()[:2] == ["materialization", "jobs.blocks.inputs[0].where"]
    assert out[1].split() == ["execution", "jobs.ranges.timeout", "30", "->", "45"]
    assert out[-1] == "rebuild: blocks"
    body = json.loads(trace("diff", EXAMPLE, new, "--json").stdout)
    assert [(c["path"], c["kind"]) for c in body["changes"]] == [
        ("jobs.blocks.inputs[0].where", "materialization"),
        ("jobs.ranges.timeout", "execution"),
    ]
    assert body["rebuild"] == ["blocks"]
    same = trace("diff", EXAMPLE, EXAMPLE)
    assert (same.returncode, same.stdout.strip()) == (0, "no changes")


def test_diff_refuses_an_invalid_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: d\njobs: {}\n")
    done = trace("diff", EXAMPLE, bad)
    assert done.returncode == 1
    assert "jobs: a DAG needs at least one job" in done.stderr


def test_schema_prints_the_shipped_json_schema() -> None:
    done = trace("schema")
    assert done.returncode == 0
    assert json.loads(done.stdout)["title"] == "Trace DAG file"


def test_invalidate_needs_one_scope_and_a_well_formed_range() -> None:
    done = trace("invalidate", "acme", "raw")
    assert done.returncode == 2 and "one of the arguments --range --key is required" in done.stderr
    done = trace("invalidate", "acme", "raw", "--range", "10:5x")
    assert done.returncode == 1 and "--range takes START:END" in done.stderr
    done = trace("invalidate", "acme", "raw", "--range", "0:10", "--key", "k")
    assert done.returncode == 2 and "not allowed with argument" in done.stderr
