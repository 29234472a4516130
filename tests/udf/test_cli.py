"""``trace udf init|build|test`` as processes: a scaffold that builds and runs, deterministic
digests, the example's local run, and refusals naming the field."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

from trace_core import udf

ROOT = Path(__file__).resolve().parents[2]


def trace(cwd: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trace_servers.cli", "udf", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env={
            "PATH": "/usr/bin:/bin",
            "TRACE_HOME": str(cwd),
            "PYTHONPATH": f"{ROOT}/src:{ROOT}/servers",
        },
    )


def ok(cwd: Path, *argv: str) -> Any:
    out = trace(cwd, *argv)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_init_build_test_a_scaffold(tmp_path: Path) -> None:
    ok(tmp_path, "init", "hello")
    first = ok(tmp_path, "build", "hello")
    (tmp_path / "hello" / "notes.txt").write_text("not packed in a python bundle")
    second = ok(tmp_path, "build", "hello", "--out", str(tmp_path / "again.zip"))
    assert first["digest"] == second["digest"]  # deterministic
    data = (tmp_path / "again.zip").read_bytes()
    assert udf.digest_of(data) == first["digest"]
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        names = zf.namelist()
        assert {i.date_time for i in zf.infolist()} == {(1980, 1, 1, 0, 0, 0)}
    assert "handler.py" in names and "trace_udf/runtime.py" in names
    assert "notes.txt" not in names
    run = ok(tmp_path, "test", "hello")
    assert run["result"] == {"read": 0, "emitted": 3}
    assert run["batch_keys"] == {"hello_rows": ["hello_rows.0.0"]}


def test_the_example_runs_locally() -> None:
    run = ok(ROOT, "test", "examples/udf/python/heavy_blocks")
    assert run["result"] == {"scanned": 3, "heavy": 2}
    assert [r["number"] for r in run["rows"]["heavy_blocks"]] == [101, 102]


def test_a_rust_bundle_packs_its_bootstrap_executable(tmp_path: Path) -> None:
    d = tmp_path / "rusty"
    d.mkdir()
    (d / "trace-udf.json").write_text(
        json.dumps({"format": 1, "name": "rusty", "language": "rust", "handler": "main"})
    )
    refused = trace(tmp_path, "build", "rusty")
    assert refused.returncode == 2 and "entry" in refused.stderr
    (d / "bootstrap").write_bytes(b"#!/bin/sh\nexit 0\n")
    built = ok(tmp_path, "build", "rusty")
    with zipfile.ZipFile(built["path"]) as zf:
        info = zf.getinfo("bootstrap")
        assert (info.external_attr >> 16) & 0o777 == 0o755


def test_a_bad_manifest_is_refused_naming_the_field(tmp_path: Path) -> None:
    d = tmp_path / "bad"
    d.mkdir()
    (d / "trace-udf.json").write_text(
        json.dumps(
            {
                "format": 1,
                "name": "bad",
                "language": "python",
                "handler": "h.f",
                "limits": {"memory_mb": 1},
            }
        )
    )
    out = trace(tmp_path, "build", "bad")
    assert out.returncode == 2
    assert out.stderr.startswith("limits.memory_mb:")
    assert not (d / "dist").exists()
