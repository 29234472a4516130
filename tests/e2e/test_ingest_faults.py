"""``cryo_ingest`` under kill -9 of the worker process, with real processes: a Dispatcher and
workers (``trace_servers.cli``), a real anvil node behind a loopback proxy that holds the
extract's block requests, so the worker is killed while its Cryo child is mid-extract.

Only the worker's PID is killed (not its process group): the extract child, and the warm one
waiting for the next extract, must die on their own with their parent (``PR_SET_PDEATHSIG``). Then the attempt's lease expires, a new worker's attempt
commits the range once, and no partition of the killed attempt exists."""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import importlib.util
import json
import os
import signal
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import pytest
from e2e_harness import TraceProcs

from trace_lite.chain.devnode import DevNode, anvil_path, make_activity
from trace_lite.datasets import Datasets
from trace_lite.dispatcher import open_pool

ORG = "default"
DATATYPES = ("blocks", "transactions", "logs")


@pytest.fixture
def node() -> Iterator[DevNode]:
    try:
        anvil_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    if importlib.util.find_spec("cryo") is None:
        pytest.skip("cryo is not installed (the ingest extra: linux x86_64 only)")
    node = DevNode.start()
    try:
        make_activity(node.rpc(), 60)
        yield node
    finally:
        node.stop()


class _Hold(http.server.BaseHTTPRequestHandler):
    """Forwards JSON-RPC to ``upstream``; while ``open`` is clear, block requests wait."""

    protocol_version = "HTTP/1.1"
    upstream = ""
    open = threading.Event()
    held = threading.Event()

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers["content-length"]))
        body = json.loads(raw)
        if isinstance(body, dict) and body.get("method") == "eth_getBlockByNumber":
            self.held.set()
            if not self.open.wait(120):
                return
        req = urllib.request.Request(
            self.upstream, raw, headers={"content-type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            data = resp.read()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def holding_proxy(node: DevNode) -> Iterator[type[_Hold]]:
    handler = type(
        "Hold",
        (_Hold,),
        {"upstream": node.url, "open": threading.Event(), "held": threading.Event()},
    )
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    handler.url = f"http://127.0.0.1:{server.server_address[1]}"  # type: ignore[attr-defined]
    try:
        yield handler
    finally:
        handler.open.set()
        server.shutdown()
        server.server_close()


def _setup_datasets(db_url: str) -> None:
    async def go() -> None:
        pool = await open_pool(db_url, min_size=1, max_size=2)
        try:
            ds = Datasets(pool)
            await ds.ensure_dag(ORG, "chain")
            versions = {}
            for name in DATATYPES:
                await ds.register(ORG, name, dag="chain", job="ingest", update_strategy="append")
                versions[name] = await ds.open_version(None, ORG, name)
            await ds.cutover(None, ORG, "chain", versions)
        finally:
            await pool.close()

    asyncio.run(go())


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie nobody reaped yet counts as dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _cryo_children(parent: int, *, running: bool) -> list[int]:
    """PIDs of live extract children (``_cryo_child.py``) of ``parent``: those running an
    extract (named ``trace-cryo-run``), or all of them (a warm one waits, ``trace-cryo-idle``)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
            comm = (entry / "comm").read_text().strip()
            if (
                ppid == parent
                and b"_cryo_child.py" in cmdline
                and (comm == "trace-cryo-run" or not running)
                and _alive(int(entry.name))
            ):
                found.append(int(entry.name))
    return found


def test_a_worker_killed_mid_extract_leaves_no_child_and_the_retry_commits_once(
    trace_procs: TraceProcs, holding_proxy: Any
) -> None:
    t = trace_procs
    _setup_datasets(t.db_url)
    t.start_dispatcher()
    worker = t.start_worker(concurrency=2)
    task_id = t.create_task(
        "cryo_ingest",
        {"start": 0, "end": 50, "rpc_url": holding_proxy.url},
        timeout_s=120,
        max_attempts=5,
    )
    # attempt 1's child asked for the head, then its block requests are held: mid-extract
    t.wait_until(holding_proxy.held.is_set, 60, "the extract to ask for blocks")
    (child,) = t.wait_until(
        lambda: _cryo_children(worker.pid, running=True), 10, "the extract child"
    )
    children = _cryo_children(worker.pid, running=False)  # and the warm one for the next
    assert child in children
    os.kill(worker.pid, signal.SIGKILL)  # the worker only: the children must follow on their own
    worker.popen.wait(10)
    t.wait_until(
        lambda: not any(_alive(pid) for pid in children),
        30,
        f"extract children {children} to die with their worker",
    )
    assert t.sql("SELECT count(*) FROM dataset_partitions") == [(0,)]

    holding_proxy.open.set()
    second = t.start_worker(concurrency=2)
    t.wait_terminal([task_id], 90)
    attempts = t.sql(
        "SELECT attempt, outcome FROM task_attempts WHERE task_id = %s ORDER BY attempt", (task_id,)
    )
    assert t.scalar("SELECT state FROM tasks WHERE task_id = %s", (task_id,)) == "completed"
    assert attempts[0][0] == 1 and attempts[0][1] != "succeeded", attempts
    assert attempts[-1][1] == "succeeded", attempts
    winner = attempts[-1][0]
    # one partition per datatype, all from the attempt that succeeded; none from attempt 1
    parts = t.sql(
        "SELECT d.name, p.range_start, p.range_end, p.attempt, p.object_key "
        "FROM dataset_partitions p JOIN dataset_versions v USING (dataset_version) "
        "JOIN datasets d ON d.dataset_uuid = v.dataset_uuid ORDER BY d.name"
    )
    assert [(n, s, e, a) for n, s, e, a, _ in parts] == [
        (name, 0, 50, winner) for name in sorted(DATATYPES)
    ]
    (blocks_key,) = [k for n, *_, k in parts if n == "blocks"]
    data = t.read_object(blocks_key)
    path = t.home / "blocks.parquet"
    path.write_bytes(data)
    rows = duckdb.sql(
        "SELECT block_number FROM read_parquet(?) ORDER BY 1", params=[str(path)]
    ).fetchall()
    assert rows == [(n,) for n in range(50)]
    # no extract left running under either worker
    assert _cryo_children(second.pid, running=True) == []
    assert not any(_alive(pid) for pid in children)
