"""Node and Rust UDFs that crash, hang, run out of memory, raise or answer the wrong shape, through a
real Dispatcher and the Lite runner: each attempt ends ``failed`` with an ``error.code`` naming
the cause, the task is retried per its ``max_attempts``, nothing the handler emitted is published,
and no process is left. The handlers are the SDKs' conformance examples (``payload.mode``), built
by each SDK's tools and packed by ``trace udf build``."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from udf_lang_fakes import (
    CARGO,
    NODE_SDK,
    build_node_bundle,
    build_node_sdk,
    build_rust_bundle,
)

from conftest import UdfProcs
from trace_servers.udf_cli import build

#: mode -> (limits, error.code, text in the message per language)
CASES: dict[str, tuple[dict[str, Any], str, dict[str, str]]] = {
    "exit": ({}, "udf_crashed", {"node": "exited with code 3", "rust": "exited with code 3"}),
    "hang": ({"timeout_s": 2}, "udf_timeout", {"node": "within 2 s", "rust": "within 2 s"}),
    "memory": (
        {"memory_mb": 256},
        "udf_out_of_memory",
        {"node": "RangeError.OutOfMemory", "rust": "Runtime.OutOfMemory"},
    ),
    "error": ({}, "udf_error", {"node": "TypeError: boom", "rust": "HandlerError: boom"}),
    "array": (
        {},
        "udf_error",
        {
            "node": "Runtime.InvalidResult: the handler returned an array",
            "rust": "Runtime.InvalidResult: the handler returned an array",
        },
    ),
}


def _bundle(tmp: Path, language: str, limits: dict[str, Any]) -> bytes:
    if language == "node":
        if shutil.which("node") is None:
            pytest.skip("node is not installed")
        build_node_sdk()
        out = build_node_bundle(NODE_SDK / "examples" / "conformance", tmp / "node")
        manifest = json.loads((out / "trace-udf.json").read_text())
    else:
        if not os.access(CARGO, os.X_OK):
            pytest.skip(f"cargo is not installed ({CARGO})")
        out = build_rust_bundle(tmp / "rust", name="conformance-rust", example="conformance")
        manifest = json.loads((out / "trace-udf.json").read_text())
    manifest["limits"] = limits
    (out / "trace-udf.json").write_text(json.dumps(manifest))
    return build(out)[1]


@pytest.mark.parametrize("language", ["node", "rust"])
@pytest.mark.parametrize("mode", sorted(CASES))
def test_a_failing_node_or_rust_udf_fails_its_attempts_with_the_cause_and_leaves_nothing(
    udf_procs: UdfProcs, tmp_path: Path, language: str, mode: str
) -> None:
    limits, code, messages = CASES[mode]
    data = _bundle(tmp_path, language, limits)
    udf_procs.start_runner()
    bundle = udf_procs.put_bundle(data)
    task_id = udf_procs.create_task(
        "udf", {"bundle": bundle, "mode": mode}, runtime="lambda", max_attempts=2, timeout_s=30
    )
    assert udf_procs.wait_terminal([task_id], 120) == {"failed": 1}
    attempts = udf_procs.sql(
        "SELECT attempt, outcome, error FROM task_attempts WHERE task_id = %s ORDER BY attempt",
        (task_id,),
    )
    assert [(a, o) for a, o, _ in attempts] == [(1, "failed"), (2, "failed")]  # retried once
    for _, _, error in attempts:
        assert error["code"] == code, error
        assert messages[language] in error["message"], error
    # nothing partial: the handler emitted a row before failing, and no batch exists
    assert udf_procs.counts()["buffer_batches"] == 0
    udf_procs.wait_until(lambda: not udf_procs.udf_pids(), 10, "UDF processes to be gone")
    assert udf_procs.runner_health()["failed"] == 2
