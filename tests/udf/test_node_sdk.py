"""The Node SDK's own unit tests (``sdks/node/test``, ``node --test``) against its compiled
``dist/`` (``tsc``, rebuilt when the sources change): batching, keys, grants, result and event
checks, the local harness, and ``build.mjs`` (deterministic bundles, ``--typecheck``)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from udf_lang_fakes import NODE_SDK, build_node_bundle, build_node_sdk

pytestmark = pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")


def test_the_node_sdk_unit_tests_pass() -> None:
    build_node_sdk()
    run = subprocess.run(
        ["node", "--test", "test/"], cwd=NODE_SDK, capture_output=True, text=True, timeout=240
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    passed = re.search(r"^# pass (\d+)$", run.stdout, re.M)
    failed = re.search(r"^# fail (\d+)$", run.stdout, re.M)
    assert passed and failed, run.stdout[-2000:]
    assert int(passed.group(1)) >= 7 and int(failed.group(1)) == 0


def test_the_harness_cli_runs_a_built_handler(tmp_path: Path) -> None:
    build_node_sdk()
    out = build_node_bundle(NODE_SDK / "examples" / "squares", tmp_path / "squares")
    cli = NODE_SDK / "dist" / "harness_cli.js"
    ok = subprocess.run(
        ["node", str(cli), str(out / "handler.mjs"), "-"],
        input='{"payload": {"n": 2, "output": "sq"}}',
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stderr
    assert '"sq": [\n      {\n        "i": 0' in ok.stdout
    bad = subprocess.run(
        ["node", str(cli), str(out / "handler.mjs"), "-"],
        input='{"payload": {"n": -1}}',
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 1
    assert '"errorType": "NonRetryableError"' in bad.stdout
