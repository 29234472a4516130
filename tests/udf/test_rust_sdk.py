"""The Rust crate's own unit tests (``cargo test --offline``: JSON, HTTP/1.1 parsing, RFC 3339,
batching, event checks, the local harness) and its offline build: no registry is reached (the
crate has no dependencies)."""

from __future__ import annotations

import os
import re
import subprocess

import pytest
from udf_lang_fakes import CACHE, CARGO, RUST_SDK

pytestmark = pytest.mark.skipif(
    not os.access(CARGO, os.X_OK), reason=f"cargo is not installed ({CARGO}): Rust SDK not built"
)


def test_the_crate_builds_offline_and_its_unit_tests_pass() -> None:
    run = subprocess.run(
        [CARGO, "test", "--offline", "--quiet"],
        cwd=RUST_SDK,
        env={
            **os.environ,
            "CARGO_TARGET_DIR": str(CACHE / "cargo-target"),
            "CARGO_NET_OFFLINE": "true",
        },
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    results = re.findall(r"test result: ok\. (\d+) passed; (\d+) failed", run.stdout)
    assert results and sum(int(p) for p, _ in results) >= 15
    assert all(f == "0" for _, f in results)


def test_the_crate_has_no_dependencies() -> None:
    manifest = (RUST_SDK / "Cargo.toml").read_text()
    dependencies = manifest.split("[dependencies]", 1)[1].split("\n[", 1)[0]
    assert [line for line in dependencies.splitlines() if line and not line.startswith("#")] == []
