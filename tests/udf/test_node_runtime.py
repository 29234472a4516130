"""The Node SDK's runtime (``sdks/node``) passes the runtime conformance suite: the conformance
handler (``sdks/node/examples/conformance/handler.ts``) is compiled by ``build.mjs`` (esbuild) and
started as the Lite runner starts a Node bundle, ``node runtime.mjs``, with the runner's minimal
environment."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest
from udf_lang_conformance import RuntimeConformance
from udf_lang_fakes import (
    NODE_SDK,
    TaskApi,
    bootstrap,
    build_node_bundle,
    build_node_sdk,
    write_files,
)

pytestmark = pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")


@pytest.fixture(scope="module")
def conformance_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    build_node_sdk()
    out = tmp_path_factory.mktemp("node-conformance")
    return build_node_bundle(NODE_SDK / "examples" / "conformance", out / "bundle")


def node_cmd(bundle: Path) -> list[str]:
    return [shutil.which("node") or "node", str(bundle / "runtime.mjs")]


class TestNodeRuntime(RuntimeConformance):
    error_type = "TypeError"
    crash_type = "RangeError"

    @pytest.fixture
    def start_cmd(self, conformance_bundle: Path) -> list[str]:
        return node_cmd(conformance_bundle)


@pytest.mark.parametrize(
    ("source", "error_type", "message"),
    [
        (
            "export const notTheHandler = () => ({});",
            "Runtime.HandlerNotFound",
            "exports no function",
        ),
        ("throw new Error('broken at load');", "Runtime.ImportModuleError", "broken at load"),
    ],
)
async def test_a_handler_that_cannot_be_loaded_is_an_init_error(
    tmp_path: Path, source: str, error_type: str, message: str
) -> None:
    build_node_sdk()
    src = write_files(tmp_path / "src", {"handler.ts": source})
    bundle = build_node_bundle(src, tmp_path / "out", name="broken")
    async with bootstrap(node_cmd(bundle)) as running:
        async with asyncio.timeout(30):
            code = await running.proc.wait()
    assert code == 1
    ((header, body),) = running.api.init_errors
    assert header == body["errorType"] == error_type
    assert message in body["errorMessage"]


async def test_the_example_handler_reads_emits_and_refuses_bad_input(tmp_path: Path) -> None:
    build_node_sdk()
    bundle = build_node_bundle(NODE_SDK / "examples" / "squares", tmp_path / "squares")
    tasks = TaskApi()
    tasks.answers["SELECT count(*) AS total FROM blocks"] = {
        "columns": [{"name": "total", "type": "BIGINT"}],
        "rows": [[7]],
        "truncated": False,
        "versions": {},
    }
    async with bootstrap(node_cmd(bundle), tasks=tasks) as running:
        ok = await running.api.answer(
            running.api.queue(tasks.event({"n": 2, "input": "blocks", "output": "sq"}))
        )
        bad = await running.api.answer(running.api.queue(tasks.event({"n": -1})))
    assert ok.body == {
        "result": {"emitted": 2, "base": 7, "attempt": 1},
        "final_events": [{"key": "done", "type": "squares.done", "payload": {"rows": 2}}],
    }
    (publish,) = tasks.routes("buffer-publish")
    assert publish["batch"]["key"] == "sq.0.0"
    assert publish["batch"]["rows"] == [{"i": 0, "sq": 0, "base": 7}, {"i": 1, "sq": 1, "base": 7}]
    assert bad.body["errorType"] == "NonRetryableError"
