"""What a Node UDF cannot do, tried from inside a TypeScript handler under the Lite runner with
network and PID namespaces (root): call ``/internal/*``, read a dataset its task was not
granted, find a platform secret in its environment, reach the Dispatcher or another host except
through the runner's relay. The Python twin is ``test_security_e2e.py``; this one shows the same
holds for the Node runtime (its ``fetch`` and ``net`` go nowhere else)."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
from pathlib import Path
from typing import Any

import pytest
from udf_lang_fakes import build_node_bundle, build_node_sdk, write_files

from conftest import UdfProcs
from trace_lite.datasets import Datasets
from trace_lite.dispatcher import open_pool
from trace_servers.udf_cli import build

pytestmark = [
    pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed"),
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
]

PROBE = """
import { connect } from "node:net";
import { TaskApiError, type Handler, type JsonObject } from "@trace/udf";

const reach = (host: string, port: number): Promise<string> =>
  new Promise((resolve) => {
    const socket = connect({ host, port, timeout: 3000 });
    socket.on("connect", () => { socket.destroy(); resolve("connected"); });
    socket.on("timeout", () => { socket.destroy(); resolve("timeout"); });
    socket.on("error", (err: NodeJS.ErrnoException) => resolve(err.code ?? err.name));
  });

export const handler: Handler = async (ctx) => {
  const p = ctx.payload as { dispatcher_port: number; outside_ip: string; outside_port: number };
  const api = process.env.TRACE_TASK_API_URL ?? "";
  const internal = await fetch(`${api}/internal/task-fetch?task_id=${ctx.event.task_id}`, {
    headers: { "X-Trace-Task-Capability": ctx.event.capability_token },
  });
  const internalBody = (await internal.json().catch(() => ({}))) as { error?: string };
  let notGranted: JsonObject = {};
  try {
    await ctx.query("SELECT * FROM secret_ds");
  } catch (exc) {
    notGranted = exc instanceof TaskApiError ? { status: exc.status, code: exc.code } : { other: String(exc) };
  }
  const granted = await ctx.query("SELECT count(*) AS n FROM granted");
  return {
    uid: process.getuid?.() ?? -1,
    env: Object.keys(process.env).sort(),
    internal_fetch: [internal.status, internalBody.error ?? null],
    query_not_granted: notGranted,
    query_granted: Number(granted[0]?.n ?? -1),
    dispatcher_direct: await reach("127.0.0.1", p.dispatcher_port),
    outside_host: await reach(p.outside_ip, p.outside_port),
  };
};
"""


def _datasets(db_url: str) -> None:
    async def go() -> None:
        pool = await open_pool(db_url, min_size=1, max_size=2)
        try:
            ds = Datasets(pool)
            await ds.ensure_dag("default", "chain")
            for name in ("granted", "secret_ds"):
                await ds.register("default", name, dag="chain", job="ingest")
                version = await ds.open_version(None, "default", name)
                await ds.cutover(None, "default", "chain", {name: version})
        finally:
            await pool.close()

    asyncio.run(go())


def _outside_ip() -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # picks a source address; sends nothing
            return str(s.getsockname()[0])
        except OSError:
            return "127.0.0.1"


def test_a_node_udf_cannot_leave_its_attempt(udf_procs: UdfProcs, tmp_path: Path) -> None:
    _datasets(udf_procs.db_url)
    udf_procs.start_runner(isolation="netns")
    build_node_sdk()
    src = write_files(tmp_path / "src", {"handler.ts": PROBE})
    data = build(build_node_bundle(src, tmp_path / "probe", name="probe-node"))[1]
    bundle = udf_procs.put_bundle(data)
    listener = socket.create_server((_outside_ip(), 0))
    try:
        payload: dict[str, Any] = {
            "bundle": bundle,
            "dispatcher_port": udf_procs.port,
            "outside_ip": listener.getsockname()[0],
            "outside_port": listener.getsockname()[1],
        }
        task_id = udf_procs.create_task(
            "udf", payload, runtime="lambda", timeout_s=60, read_datasets=["granted"]
        )
        assert udf_procs.wait_terminal([task_id], 90) == {"completed": 1}
        r = udf_procs.scalar("SELECT result FROM tasks WHERE task_id = %s", (task_id,))
    finally:
        listener.close()

    assert r["internal_fetch"] == [403, "forbidden"]  # the relay forwards /v1/task/* only
    assert r["query_not_granted"] == {"status": 404, "code": "not_found"}
    assert r["query_granted"] == 0
    assert r["uid"] == 65534
    assert r["dispatcher_direct"] == "ECONNREFUSED"  # an empty namespace: nothing listens
    assert r["outside_host"] != "connected"
    allowed = {
        "AWS_LAMBDA_RUNTIME_API",
        "TRACE_TASK_API_URL",
        "_HANDLER",
        "LAMBDA_TASK_ROOT",
        "AWS_LAMBDA_FUNCTION_NAME",
        "AWS_LAMBDA_FUNCTION_VERSION",
        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
        "PATH",
        "LANG",
        "TZ",
        "HOME",
        "TMPDIR",
    }
    assert set(r["env"]) <= allowed, set(r["env"]) - allowed
