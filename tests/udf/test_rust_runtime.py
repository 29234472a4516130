"""The Rust crate's runtime (``sdks/rust``, std only) passes the runtime conformance suite: the
``conformance`` example is built with ``cargo build --offline --release`` (cached under
``.trace/udf-sdks`` by source digest) and started as the Lite runner starts a Rust bundle's
``bootstrap``, with the runner's minimal environment."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from udf_lang_conformance import RuntimeConformance
from udf_lang_fakes import CARGO, TaskApi, bootstrap, build_rust

pytestmark = pytest.mark.skipif(
    not os.access(CARGO, os.X_OK), reason=f"cargo is not installed ({CARGO}): Rust SDK not built"
)


@pytest.fixture(scope="module")
def conformance_exe() -> Path:
    return build_rust("conformance")


class TestRustRuntime(RuntimeConformance):
    error_type = "HandlerError"
    crash_type = "Panic"

    @pytest.fixture
    def start_cmd(self, conformance_exe: Path) -> list[str]:
        return [str(conformance_exe)]


async def test_the_example_bootstrap_reads_emits_and_refuses_bad_input() -> None:
    exe = [str(build_rust("bootstrap"))]
    tasks = TaskApi()
    tasks.answers["SELECT count(*) AS total FROM blocks"] = {
        "columns": [{"name": "total", "type": "BIGINT"}],
        "rows": [[7]],
        "truncated": False,
        "versions": {},
    }
    async with bootstrap(exe, tasks=tasks) as running:
        ok = await running.api.answer(
            running.api.queue(tasks.event({"n": 2, "input": "blocks", "output": "sq"}))
        )
        bad = await running.api.answer(running.api.queue(tasks.event({"n": -1})))
    assert ok.body == {"result": {"emitted": 2, "base": 7, "attempt": 1}, "final_events": []}
    (publish,) = tasks.routes("buffer-publish")
    assert publish["batch"]["key"] == "sq.0.0"
    assert publish["batch"]["rows"] == [{"i": 0, "sq": 0, "base": 7}, {"i": 1, "sq": 1, "base": 7}]
    assert bad.body["errorType"] == "NonRetryableError"
