"""UDF invocation benchmark: what the Lite runner adds to a Python handler.

    .venv/bin/python -m bench.udf [--n 200] [--concurrency 4] [--isolation none|netns]

One process holds a ``trace_lite.udf.Runner`` and a stub of the task API (``/v1/task/*``
answers at once, bundles served from memory), so the numbers are the runner's and the
runtime's, not the Dispatcher's. It measures, for one small handler (reads its payload, emits
10 rows and an event, returns a dict):

* **direct**: ``trace_udf.runtime.invoke`` on a ``Context`` in this process -- the floor;
* **cold**: the first invocation of a bundle (a new digest each time): fetch, digest check,
  unpack, start the runtime process, Runtime API round trips, publish, complete;
* **warm**: later invocations of the same bundle in a warm runtime;
* **throughput**: ``--n`` invocations through ``--concurrency`` warm runtimes, tasks/s;
* **node** (when ``node`` and the Node SDK's build dependencies are present): cold and warm
  invocations of the Node SDK's example bundle (``sdks/node/examples/squares``) through the
  same runner.

Prints medians and p95 in milliseconds. Not a timed test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from aiohttp import web

from trace_core import udf, wire
from trace_lite.udf import Runner, RunnerConfig, python_bundle
from trace_lite.udf.environment import netns_available
from trace_udf import Context, Invocation
from trace_udf.runtime import invoke

HANDLER = """
def handler(ctx):
    for i in range(10):
        pass
    ctx.emit_rows("bench_rows", [{"i": i, "task": ctx.event.task_id} for i in range(10)])
    ctx.emit_event("bench.done", {"n": 10}, key="done")
    return {"n": ctx.payload.get("n", 0)}
"""


def handler_module() -> Any:
    namespace: dict[str, Any] = {}
    exec(HANDLER, namespace)
    return namespace["handler"]


class StubTaskApi:
    """Answers ``/v1/task/*`` at once and serves bundles from memory."""

    def __init__(self) -> None:
        self.bundles: dict[str, bytes] = {}
        self.completions = 0

    async def bundle(self, request: web.Request) -> web.Response:
        return web.Response(body=self.bundles[request.match_info["key"]])

    async def task(self, request: web.Request) -> web.Response:
        body = await request.json()
        match request.match_info["op"]:
            case "heartbeat":
                expires = (datetime.now(UTC) + timedelta(seconds=60)).isoformat()
                return web.json_response({"lease_expires_at": expires, "capability_token": "t"})
            case "complete":
                self.completions += 1
                return web.json_response(
                    {
                        "task_id": body["task_id"],
                        "attempt": body["attempt"],
                        "state": "completed",
                        "replay": False,
                    }
                )
            case _:
                return web.json_response({"accepted": True, "duplicate": False})

    def app(self) -> web.Application:
        app = web.Application(client_max_size=8 * 1024 * 1024)
        app.router.add_get("/o/{key:.*}", self.bundle)
        app.router.add_post("/v1/task/{op}", self.task)
        return app


def payload(url: str, bundle: dict[str, str], n: int) -> wire.LambdaInvokePayload:
    task_id = str(uuid.uuid4())
    return wire.LambdaInvokePayload(
        task_id=task_id,
        org_id="00000000-0000-4000-8000-00000000000b",
        job_id=None,
        operator="udf",
        payload={"bundle": bundle, "n": n},
        status="running",
        attempt=1,
        max_attempts=1,
        timeout_s=60,
        staging_prefix=f"org/b/staging/task/{task_id}/attempt/1/",
        capability_token="t",
        lease_token=str(uuid.uuid4()),
        lease_expires_at=(datetime.now(UTC) + timedelta(seconds=60)).isoformat(),
        bundle_url=f"{url}/o/{bundle['digest']}",
    )


def ms(samples: list[float]) -> str:
    s = sorted(samples)
    p95 = s[min(len(s) - 1, int(len(s) * 0.95))]
    return f"median {statistics.median(s) * 1000:8.2f} ms   p95 {p95 * 1000:8.2f} ms"


async def main(n: int, concurrency: int, isolation: str, cold: int) -> None:
    stub = StubTaskApi()
    site_runner = web.AppRunner(stub.app(), access_log=None)
    await site_runner.setup()
    site = web.TCPSite(site_runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    url = f"http://127.0.0.1:{port}"
    work = Path(tempfile.mkdtemp(prefix="trace-udf-bench-"))
    os.chmod(work, 0o711)
    python = sys.executable
    if isolation == "netns":
        python = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin") or python
    runner = Runner(
        RunnerConfig(
            dispatcher_url=url,
            work_dir=work,
            isolation=isolation,  # type: ignore[arg-type]
            bundle_url_prefix=url + "/o/",
            python=python,
            node=shutil.which("node"),
            concurrency=concurrency,
            max_idle=concurrency,
        )
    )
    await runner.start()

    def new_bundle(tag: str) -> dict[str, str]:
        manifest = udf.Manifest(
            "bench", udf.Language.PYTHON, "handler.handler", "", udf.Limits(256, None)
        )
        source = f"# {tag}\n{HANDLER}".encode()
        data = python_bundle(manifest, {"handler.py": source})
        ref = {"name": "bench", "digest": udf.digest_of(data)}
        stub.bundles[ref["digest"]] = data
        return ref

    try:
        # direct: the handler in this process
        handler = handler_module()
        direct = []
        for i in range(n):
            event = wire.unstructure(payload(url, {"name": "bench", "digest": "x"}, i))
            t0 = time.perf_counter()
            ctx = Context(Invocation.from_event(event), None)
            invoke(handler, ctx)
            direct.append(time.perf_counter() - t0)
        # cold: a new digest each time
        colds = []
        for i in range(cold):
            ref = new_bundle(f"cold {i}")
            t0 = time.perf_counter()
            assert await runner.run(payload(url, ref, i)) == "succeeded"
            colds.append(time.perf_counter() - t0)
        # warm: the same bundle again, one at a time
        ref = new_bundle("warm")
        assert await runner.run(payload(url, ref, 0)) == "succeeded"
        warms = []
        for i in range(n):
            t0 = time.perf_counter()
            assert await runner.run(payload(url, ref, i)) == "succeeded"
            warms.append(time.perf_counter() - t0)
        # throughput through `concurrency` warm runtimes
        await asyncio.gather(*(runner.run(payload(url, ref, i)) for i in range(concurrency)))
        sem = asyncio.Semaphore(concurrency)

        async def one(i: int) -> str:
            async with sem:
                return await runner.run(payload(url, ref, i))

        t0 = time.perf_counter()
        outcomes = await asyncio.gather(*(one(i) for i in range(n)))
        elapsed = time.perf_counter() - t0
        assert set(outcomes) == {"succeeded"}
        print(f"UDF invocation, Python, isolation={isolation} ({n} warm, {cold} cold)")
        print(f"  direct call in-process     {ms(direct)}")
        print(f"  cold (first of a bundle)   {ms(colds)}")
        print(f"  warm runtime               {ms(warms)}")
        print(
            f"  throughput, {concurrency} warm runtimes  {n / elapsed:8.1f} tasks/s "
            f"({runner.stats['cold_starts']} cold starts in all)"
        )
        await node_rows(runner, url, stub, n, cold)
        print(json.dumps({"stats": runner.stats}))
    finally:
        await runner.close()
        await site_runner.cleanup()
        shutil.rmtree(work, ignore_errors=True)


NODE_SDK = Path(__file__).resolve().parents[1] / "sdks" / "node"


async def node_rows(runner: Runner, url: str, stub: StubTaskApi, n: int, cold: int) -> None:
    """Cold and warm invocations of a Node bundle, if the Node SDK can build one here."""
    if shutil.which("node") is None or not (NODE_SDK / "node_modules" / "esbuild").exists():
        print("  node: skipped (no node or no Node SDK build dependencies)")
        return
    from trace_servers.udf_cli import build

    colds, warms = [], []
    ref: dict[str, str] = {}
    for i in range(cold + 1):
        out = Path(tempfile.mkdtemp(prefix="trace-udf-bench-node-"))
        proc = await asyncio.create_subprocess_exec(
            "node",
            str(NODE_SDK / "build.mjs"),
            str(NODE_SDK / "examples" / "squares"),
            str(out),
            "--name",
            f"squares-{i}",
            stdout=asyncio.subprocess.DEVNULL,
        )
        assert await proc.wait() == 0
        _, data = build(out)
        shutil.rmtree(out, ignore_errors=True)
        ref = {"name": f"squares-{i}", "digest": udf.digest_of(data)}
        stub.bundles[ref["digest"]] = data
        t0 = time.perf_counter()
        outcome = await runner.run(payload(url, ref, 3))
        assert outcome == "succeeded", runner.failures
        colds.append(time.perf_counter() - t0)
    for _ in range(n):
        t0 = time.perf_counter()
        assert await runner.run(payload(url, ref, 3)) == "succeeded"
        warms.append(time.perf_counter() - t0)
    print(f"  node cold (first of a bundle) {ms(colds)}")
    print(f"  node warm runtime          {ms(warms)}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--cold", type=int, default=10)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--isolation", choices=["none", "netns", "auto"], default="auto")
    args = ap.parse_args()
    iso = args.isolation
    if iso == "auto":
        iso = "netns" if netns_available() else "none"
    asyncio.run(main(args.n, args.concurrency, iso, args.cold))
