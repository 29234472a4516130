"""UDF invocation overhead per language (Node, Rust) through the Lite runner.

    .venv/bin/python -m bench.udf_langs [--n 100] [--cold 5] [--isolation none|netns|auto]

The same set-up as ``bench/udf.py`` (a ``trace_lite.udf.Runner`` in this process and a stub of
the task API that answers at once), with each SDK's conformance handler in mode ``ok`` (reads its
payload, emits 10 rows and an event, returns an object), built by the SDK's own tools
(``sdks/node/build.mjs``; ``cargo build --offline --release``). Per language:

* **direct**: the handler through the SDK's local harness in one process (Node: ``runLocal`` in
  a ``node`` process; Rust: ``conformance --direct``) -- the floor;
* **cold**: the first invocation of a bundle (a new digest each time): fetch, digest check,
  unpack, start the runtime process, Runtime API round trips, publish, complete;
* **warm**: later invocations of the same bundle in a warm runtime.

Prints medians and p95 in milliseconds. Not a timed test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import attrs
from aiohttp import web

from bench.udf import StubTaskApi, ms, payload
from trace_core import udf, wire
from trace_lite.udf import Runner, RunnerConfig
from trace_lite.udf.bundles import pack
from trace_lite.udf.environment import netns_available

REPO = Path(__file__).resolve().parent.parent
NODE_SDK = REPO / "sdks" / "node"
RUST_SDK = REPO / "sdks" / "rust"
TARGET = REPO / ".trace" / "udf-sdks" / "cargo-target"
CARGO = shutil.which("cargo") or "/root/.cargo/bin/cargo"
WORK_PAYLOAD = {"mode": "ok", "n": 10}


def node_bundle_files(out: Path) -> dict[str, bytes]:
    """The Node conformance bundle's files (``tsc`` for the SDK's dist, then ``build.mjs``)."""
    tsc = NODE_SDK / "node_modules" / "typescript" / "bin" / "tsc"
    subprocess.run(["node", str(tsc), "-p", str(NODE_SDK / "tsconfig.json")], check=True)
    build = NODE_SDK / "build.mjs"
    src = NODE_SDK / "examples" / "conformance"
    subprocess.run(["node", str(build), str(src), str(out)], check=True, capture_output=True)
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def rust_exe() -> Path:
    env = {**os.environ, "CARGO_TARGET_DIR": str(TARGET)}
    cmd = [CARGO, "build", "--offline", "--release", "--examples", "--quiet"]
    subprocess.run(cmd, cwd=RUST_SDK, env=env, check=True)
    return TARGET / "release" / "examples" / "conformance"


def direct_node(bundle: Path, n: int) -> list[float]:
    script = f"""
        import {{ runLocal }} from {json.dumps(str(NODE_SDK / "dist" / "harness.js"))};
        import {{ handler }} from {json.dumps(str(bundle / "handler.mjs"))};
        const took = [];
        for (let i = 0; i < {n}; i++) {{
          const t0 = process.hrtime.bigint();
          const run = await runLocal(handler, {{ payload: {json.dumps(WORK_PAYLOAD)} }});
          took.push(Number(process.hrtime.bigint() - t0) / 1e9);
          if (!run.outcome.ok) throw new Error("handler failed");
        }}
        console.log(JSON.stringify(took));
    """
    out = subprocess.run(
        ["node", "--input-type=module", "-e", script], check=True, capture_output=True, text=True
    )
    took: list[float] = json.loads(out.stdout)
    return took


def direct_rust(exe: Path, n: int) -> list[float]:
    out = subprocess.run([str(exe), "--direct", str(n)], check=True, capture_output=True, text=True)
    took: list[float] = json.loads(out.stdout)
    return took


async def measure(
    runner: Runner,
    stub: StubTaskApi,
    url: str,
    language: udf.Language,
    files: Callable[[int], dict[str, bytes]],
    executables: frozenset[str],
    n: int,
    cold: int,
) -> tuple[list[float], list[float]]:
    def new_bundle(tag: int) -> dict[str, str]:
        manifest = udf.Manifest(
            f"bench-{language.value}",
            language,
            "handler.handler" if language is udf.Language.NODE else "conformance",
            udf.DEFAULT_ENTRY[language],
            udf.Limits(256, None),
        )
        content = files(tag)
        content[udf.MANIFEST_NAME] = json.dumps(manifest.to_json(), sort_keys=True).encode()
        data = pack(content, executables)
        ref = {"name": manifest.name, "digest": udf.digest_of(data)}
        stub.bundles[ref["digest"]] = data
        return ref

    def event(ref: dict[str, str], i: int) -> wire.LambdaInvokePayload:
        p = payload(url, ref, i)
        return attrs.evolve(p, payload={**p.payload, **WORK_PAYLOAD})

    colds = []
    for i in range(cold):
        ref = new_bundle(i + 1)
        t0 = time.perf_counter()
        outcome = await runner.run(event(ref, i))
        assert outcome == "succeeded", outcome
        colds.append(time.perf_counter() - t0)
    ref = new_bundle(0)
    assert await runner.run(event(ref, 0)) == "succeeded"
    warms = []
    for i in range(n):
        t0 = time.perf_counter()
        assert await runner.run(event(ref, i)) == "succeeded"
        warms.append(time.perf_counter() - t0)
    return colds, warms


async def main(n: int, cold: int, isolation: str) -> None:
    stub = StubTaskApi()
    site_runner = web.AppRunner(stub.app(), access_log=None)
    await site_runner.setup()
    site = web.TCPSite(site_runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    url = f"http://127.0.0.1:{port}"
    work = Path(tempfile.mkdtemp(prefix="trace-udf-langs-"))
    os.chmod(work, 0o711)
    runner = Runner(
        RunnerConfig(
            dispatcher_url=url,
            work_dir=work,
            isolation=isolation,
            bundle_url_prefix=url + "/o/",
            python=sys.executable,
            node=shutil.which("node", path="/usr/local/bin:/usr/bin:/bin"),
            concurrency=1,
            max_idle=1,
        )
    )
    await runner.start()
    try:
        node_dir = work / "node-bundle"
        node_files = node_bundle_files(node_dir)
        exe = rust_exe()
        rust_bytes = exe.read_bytes()

        def node(tag: int) -> dict[str, bytes]:  # a new digest per tag: a comment in the handler
            files = dict(node_files)
            files["handler.mjs"] = files["handler.mjs"] + f"\n// {tag}\n".encode()
            return files

        def rust(tag: int) -> dict[str, bytes]:
            return {"bootstrap": rust_bytes, "tag.txt": str(tag).encode()}

        rows = [
            ("Node", direct_node(node_dir, n))
            + await measure(runner, stub, url, udf.Language.NODE, node, frozenset(), n, cold),
            ("Rust", direct_rust(exe, n))
            + await measure(
                runner, stub, url, udf.Language.RUST, rust, frozenset({"bootstrap"}), n, cold
            ),
        ]
        print(f"UDF invocation per language, isolation={isolation} ({n} warm, {cold} cold)")
        for name, direct, colds, warms in rows:
            print(f"  {name:5} direct (harness)   {ms(direct)}")
            print(f"  {name:5} cold (first)       {ms(colds)}")
            print(f"  {name:5} warm runtime       {ms(warms)}")
        print(json.dumps({"stats": runner.stats}))
    finally:
        await runner.close()
        await site_runner.cleanup()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--cold", type=int, default=5)
    ap.add_argument("--isolation", choices=["none", "netns", "auto"], default="auto")
    args = ap.parse_args()
    iso = args.isolation
    if iso == "auto":
        iso = "netns" if netns_available() else "none"
    asyncio.run(main(args.n, args.cold, iso))
