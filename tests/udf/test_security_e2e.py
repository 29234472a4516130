"""What a UDF cannot do, tried from inside a handler against real processes: call
``/internal/*``, use another attempt's token (or its token on another attempt), read a dataset
its task was not granted, write outside its staging prefix, find a platform secret in its
environment or in a root-only file, reach a host other than the Dispatcher."""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from pathlib import Path
from typing import Any

import pytest

from conftest import UdfProcs, py_bundle
from trace_lite.datasets import Datasets
from trace_lite.dispatcher import open_pool

PROBE = """
    import http.client, json, os, socket, urllib.parse

    def call(method, path, body=None, token=None):
        url = urllib.parse.urlsplit(os.environ["TRACE_TASK_API_URL"])
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=20)
        headers = {"Content-Type": "application/json"}
        if token:
            headers["X-Trace-Task-Capability"] = token
        data = None if body is None else json.dumps(body).encode()
        try:
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
        finally:
            conn.close()
        try:
            doc = json.loads(raw)
        except ValueError:
            doc = {}
        return [resp.status, doc.get("error") if isinstance(doc, dict) else None]

    def connect(host, port):
        try:
            socket.create_connection((host, port), timeout=3).close()
            return "connected"
        except OSError as exc:
            return type(exc).__name__

    def read(path):
        try:
            with open(path) as f:
                return "read:" + f.read(20)
        except OSError as exc:
            return type(exc).__name__

    def handler(ctx):
        p, inv = ctx.payload, ctx.event
        mine, fence = inv.capability_token, inv.fence
        other = p["other"]
        other_fence = {k: other[k] for k in ("task_id", "attempt", "lease_token")}
        q = lambda sql: call("POST", "/v1/task/query", {**fence, "sql": sql}, mine)
        staged_elsewhere = {
            "key": "b1", "dataset": "granted", "object_key": p["foreign_key"],
            "row_count": 1, "byte_size": 2, "sha256": "0" * 64,
        }
        return {
            "internal_fetch": call("GET", "/internal/task-fetch?task_id=" + inv.task_id,
                                   token=mine),
            "internal_claim": call("POST", "/internal/task-claim", {"task_id": other["task_id"]},
                                   mine),
            "other_token_my_fence": call("POST", "/v1/task/heartbeat", fence,
                                         other["capability_token"]),
            "my_token_other_fence": call("POST", "/v1/task/heartbeat", other_fence, mine),
            "query_granted": q("SELECT count(*) AS n FROM granted"),
            "query_not_granted": q("SELECT count(*) AS n FROM secret_stuff"),
            "publish_outside_staging": call("POST", "/v1/task/buffer-publish",
                                            {**fence, "batch": staged_elsewhere}, mine),
            "put_object_unsigned": call("PUT", "/o/" + p["foreign_key"], {"x": 1}),
            "env": dict(os.environ),
            "uid": os.getuid(),
            "read_root_only": read(p["root_only_file"]),
            "read_public": read(p["public_file"]),
            "dispatcher_direct": connect("127.0.0.1", p["dispatcher_port"]),
            "outside_host": connect(p["outside_ip"], p["outside_port"]),
        }
"""


def _datasets(db_url: str) -> None:
    async def go() -> None:
        pool = await open_pool(db_url, min_size=1, max_size=2)
        try:
            ds = Datasets(pool)
            await ds.ensure_dag("default", "chain")
            for name in ("granted", "secret_stuff"):
                await ds.register("default", name, dag="chain", job="ingest")
                version = await ds.open_version(None, "default", name)
                await ds.cutover(None, "default", "chain", {name: version})
        finally:
            await pool.close()

    asyncio.run(go())


def _outside_address() -> tuple[str, int]:
    """A listening socket on a non-loopback address of this machine (reachable from the host
    network, not from an empty namespace)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
            ip = s.getsockname()[0]
        except OSError:
            ip = "127.0.0.1"
    return ip, 0


@pytest.mark.parametrize("isolation", ["netns", "none"])
def test_a_udf_cannot_leave_its_attempt(udf_procs: UdfProcs, isolation: str) -> None:
    if isolation == "netns" and os.geteuid() != 0:
        pytest.skip("namespaces need root")
    _datasets(udf_procs.db_url)
    udf_procs.start_runner(isolation=isolation)
    outside_ip, _ = _outside_address()
    listener = socket.create_server((outside_ip, 0))
    shared = Path("/tmp") / f"udf-files-{uuid.uuid4().hex[:8]}"
    shared.mkdir(mode=0o755)
    try:
        (shared / "platform_secret").write_text("s3cr3t")
        os.chmod(shared / "platform_secret", 0o600)
        (shared / "public").write_text("hello")
        os.chmod(shared / "public", 0o644)
        other_id = udf_procs.create_task("noop", {})  # a worker task nobody else runs
        other = udf_procs.claim(other_id)
        org_id = udf_procs.org_id()
        bundle = udf_procs.put_bundle(py_bundle("probe", PROBE))
        payload: dict[str, Any] = {
            "bundle": bundle,
            "other": {**other, "attempt": other["attempt"]},
            "foreign_key": f"org/{org_id}/datasets/granted/stolen.jsonl",
            "root_only_file": str(shared / "platform_secret"),
            "public_file": str(shared / "public"),
            "dispatcher_port": udf_procs.port,
            "outside_ip": outside_ip,
            "outside_port": listener.getsockname()[1],
        }
        task_id = udf_procs.create_task(
            "udf", payload, runtime="lambda", timeout_s=60, read_datasets=["granted"]
        )
        assert udf_procs.wait_terminal([task_id], 90) == {"completed": 1}
        r = udf_procs.scalar("SELECT result FROM tasks WHERE task_id = %s", (task_id,))
    finally:
        listener.close()
        for f in shared.iterdir():
            f.unlink()
        shared.rmdir()

    if isolation == "netns":  # the relay forwards /v1/task/* only
        assert r["internal_fetch"] == [403, "forbidden"]
        assert r["internal_claim"] == [403, "forbidden"]
        assert r["put_object_unsigned"] == [403, "forbidden"]
    else:  # the Dispatcher itself refuses a capability token on /internal
        assert r["internal_fetch"] == [403, "forbidden"]
        assert r["internal_claim"] == [403, "forbidden"]
        assert r["put_object_unsigned"][0] == 403
    assert r["other_token_my_fence"] == [403, "forbidden"]
    assert r["my_token_other_fence"] == [403, "forbidden"]
    assert r["query_granted"] == [200, None]
    assert r["query_not_granted"] == [404, "not_found"]
    assert r["publish_outside_staging"] == [422, "unsafe_key"]
    assert udf_procs.counts()["buffer_batches"] == 0
    secrets = [udf_procs.env()["TRACE_PLATFORM_TOKEN"], udf_procs.db_url]
    assert not [k for k, v in r["env"].items() if any(s in v for s in secrets)]
    assert not [
        k
        for k in r["env"]
        if k.startswith(("TRACE_", "PG", "AWS_"))
        and k
        not in (
            "TRACE_TASK_API_URL",
            "AWS_LAMBDA_RUNTIME_API",
            "AWS_LAMBDA_FUNCTION_NAME",
            "AWS_LAMBDA_FUNCTION_VERSION",
            "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
        )
    ]
    if isolation == "netns":
        assert r["uid"] == 65534
        assert r["read_root_only"] == "PermissionError"
        assert r["read_public"] == "read:hello"
        assert r["dispatcher_direct"] == "ConnectionRefusedError"  # an empty namespace
        assert r["outside_host"] != "connected"
    else:  # documented: without namespaces the runtime shares the host's network and user
        assert r["dispatcher_direct"] == "connected"
