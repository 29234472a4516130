"""``cryo_ingest`` end to end: the worker runs it through the in-process Dispatcher on real
Postgres and the real LocalObjectStore, against a real anvil node; what a reader resolves is
checked against the node's own answers."""

from __future__ import annotations

import asyncio
import http.server
import json
import threading
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import attrs
import duckdb
import pytest

from trace_core import wire
from trace_core.dag import OperatorInfo
from trace_core.lifecycle import RetryPolicy
from trace_core.testing import MemoryQueue, MemorySigner
from trace_lite.chain.devnode import Chain, DevNode, make_activity
from trace_lite.dag_runs import DagRuns
from trace_lite.dags import Dags
from trace_lite.datasets import Datasets
from trace_lite.dispatcher import Dispatcher, open_pool
from trace_lite.local_store import LocalObjectStore
from trace_lite.task_surface import InProcessTaskSurface
from trace_sdk import BUILTIN_OPERATORS, Worker

ORG = "acme"
DAG = "chain"
DATATYPES = ("blocks", "transactions", "logs")
DONE = ("completed", "failed")


@attrs.define
class Env:
    d: Dispatcher
    ds: Datasets
    store: LocalObjectStore
    root: Path

    async def run(self, payload: dict[str, Any], *, timeout_s: int = 60, attempts: int = 3) -> Any:
        """Create one cryo_ingest task, run a worker until it ends; returns the task."""
        (info,) = await self.d.create_tasks(
            [
                wire.CreateTaskRequest(
                    operator="cryo_ingest",
                    org=ORG,
                    payload=payload,
                    timeout_s=timeout_s,
                    max_attempts=attempts,
                )
            ]
        )
        assert self.d.queue is not None
        surface = InProcessTaskSurface(self.d)
        worker = Worker(
            surface=surface,
            queue=self.d.queue,
            operators=dict(BUILTIN_OPERATORS),
            store=self.store,
            wait_s=0.1,
        )
        stop = asyncio.Event()
        background = asyncio.create_task(self.d.run_background(stop, reap_every_s=0.05))
        running = asyncio.create_task(worker.run(stop))
        try:
            async with asyncio.timeout(120):
                while (task := await self.d.get_task(info.task_id))["state"] not in DONE:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
        finally:
            stop.set()
            await asyncio.gather(background, running)
            await surface.close()
        return task

    async def live(self, name: str) -> list[tuple[int, int, str]]:
        """What a reader is handed for ``name`` (after promotion): (start, end, object key)."""
        while await self.ds.promote_once():
            pass
        caller = await self.ds.user_caller(ORG, "dave")
        (res,) = (await self.ds.resolve(caller, ORG, [name], pin_ttl_s=0)).datasets
        assert (res.pending, res.corrupt) == (0, 0)
        return sorted((o["start"], o["end"], o["object_key"]) for o in res.objects)

    def rows(self, object_key: str) -> list[tuple[Any, ...]]:
        path = self.store.path_for(object_key)
        return duckdb.sql(
            "SELECT block_number FROM read_parquet(?) ORDER BY block_number", params=[str(path)]
        ).fetchall()


@pytest.fixture
async def env(db_url: str, tmp_path: Path) -> AsyncIterator[Env]:
    pool = await open_pool(db_url, min_size=2, max_size=12)
    store = LocalObjectStore(tmp_path / "objects", "http://127.0.0.1:1", b"s" * 32)
    d = Dispatcher(
        pool,
        signer=MemorySigner(),
        queue=MemoryQueue("tasks"),
        object_store=store,
        retry=RetryPolicy(max_attempts=3, base_s=0.0),
        rand=lambda: 0.5,
    )
    ds = Datasets(pool, object_store=store)
    await ds.ensure_dag(ORG, DAG, deployers=["dave"])
    versions = {}
    for name in DATATYPES:
        await ds.register(ORG, name, dag=DAG, job="ingest", update_strategy="append")
        versions[name] = await ds.open_version(None, ORG, name)
    await ds.cutover(None, ORG, DAG, versions)
    try:
        yield Env(d, ds, store, tmp_path / "objects")
    finally:
        await pool.close()


def _error(task: dict[str, Any]) -> str:
    return json.dumps([a["error"] for a in task["attempts"]])


async def test_committed_ranges_match_the_node_and_a_rerun_commits_nothing(
    env: Env, chain: Chain
) -> None:
    ranges = [(0, 100), (100, 250)]
    for start, end in ranges:
        task = await env.run({"start": start, "end": end, "rpc_url": chain.node.url})
        assert task["state"] == "completed", _error(task)
        events = {e["event_key"]: e["payload"] for e in task["events"]}
        assert events[f"range:logs:{start}_{end}"]["partition_key"] == f"{start}_{end}"
        assert {(p["start"], p["end"]) for p in events.values()} == {(start, end)}
    rpc = chain.rpc
    for name in DATATYPES:
        live = await env.live(name)
        # object names carry the half-open range: {start}_{end}.{task}.a{n}.parquet
        assert [(s, e, k.rsplit("/", 1)[1].split(".")[0]) for s, e, k in live] == [
            (s, e, f"{s}_{e}") for s, e in ranges
        ]
    for (start, end), (_, _, blocks_key), (_, _, txs_key), (_, _, logs_key) in zip(
        ranges, *[await env.live(n) for n in DATATYPES], strict=True
    ):
        assert env.rows(blocks_key) == [(n,) for n in range(start, end)]
        node_txs = [
            n
            for n in range(start, end)
            for _ in rpc.call("eth_getBlockByNumber", hex(n), False)["transactions"]
        ]
        assert env.rows(txs_key) == [(n,) for n in node_txs]
        node_logs = rpc.call("eth_getLogs", {"fromBlock": hex(start), "toBlock": hex(end - 1)})
        assert env.rows(logs_key) == sorted((int(x["blockNumber"], 16),) for x in node_logs)
        assert node_txs and node_logs  # the ranges are not trivially empty
    before = {n: await env.live(n) for n in DATATYPES}
    again = await env.run({"start": 0, "end": 100, "rpc_url": chain.node.url})
    assert again["state"] == "completed", _error(again)
    assert {n: await env.live(n) for n in DATATYPES} == before


async def test_a_task_of_several_chunks_commits_one_partition_per_chunk(
    env: Env, chain: Chain
) -> None:
    task = await env.run({"start": 0, "end": 250, "chunk": 100, "rpc_url": chain.node.url})
    assert task["state"] == "completed", _error(task)
    chunks = [(0, 100), (100, 200), (200, 250)]
    assert task["result"]["pieces"] == 3
    events = {e["event_key"]: e["payload"] for e in task["events"]}
    assert set(events) == {f"range:{d}:{s}_{e}" for d in DATATYPES for s, e in chunks}
    for (start, end), name in [(c, d) for c in chunks for d in DATATYPES]:
        event = events[f"range:{name}:{start}_{end}"]
        assert (event["start"], event["end"], event["partition_key"]) == (
            start,
            end,
            f"{start}_{end}",
        )
    rpc = chain.rpc
    for name in DATATYPES:
        live = await env.live(name)
        assert [(s, e, k.rsplit("/", 1)[1].split(".")[0]) for s, e, k in live] == [
            (s, e, f"{s}_{e}") for s, e in chunks
        ]
        for start, end, key in live:
            rows = env.rows(key)
            assert all(start <= n < end for (n,) in rows)
            assert events[f"range:{name}:{start}_{end}"]["rows"] == len(rows)
            if name == "blocks":
                assert rows == [(n,) for n in range(start, end)]
            if name == "logs":
                node_logs = rpc.call(
                    "eth_getLogs", {"fromBlock": hex(start), "toBlock": hex(end - 1)}
                )
                assert len(rows) == len(node_logs)
    # the same range again (one chunk per partition already there): nothing new
    before = {n: await env.live(n) for n in DATATYPES}
    again = await env.run({"start": 0, "end": 250, "chunk": 100, "rpc_url": chain.node.url})
    assert again["state"] == "completed", _error(again)
    assert {n: await env.live(n) for n in DATATYPES} == before


async def test_a_dag_job_config_chunk_cuts_each_triggered_range(
    db_url: str, tmp_path: Path, chain: Chain
) -> None:
    """``chunk`` in a job's config applies to every range the job is handed (merged with the
    trigger's payload), through a one-slot pool as a backfill runs it."""
    pool = await open_pool(db_url, min_size=2, max_size=8)
    store = LocalObjectStore(tmp_path / "objects", "http://127.0.0.1:1", b"s" * 32)
    queue = MemoryQueue("tasks")
    d = Dispatcher(pool, signer=MemorySigner(), queue=queue, object_store=store, rand=lambda: 0.5)
    dag = {
        "name": "backfill",
        "worker_pools": {"rpc": [{"env": {"RPC_URL": chain.node.url}}]},
        "jobs": {
            "ingest": {
                "operator": "cryo_ingest",
                "config": {"chunk": 50, "datasets": {"logs": "c_logs"}},
                "worker_pool": "rpc",
                "timeout": "2m",
                "triggers": [{"type": "manual"}],
                "outputs": [{"storage": "object_store", "update_strategy": "append"}],
            }
        },
        "publish": [{"job": "ingest", "output": 0, "dataset": "c_logs"}],
    }
    surface = InProcessTaskSurface(d)
    worker = Worker(
        surface=surface, queue=queue, operators=dict(BUILTIN_OPERATORS), store=store, wait_s=0.1
    )
    stop = asyncio.Event()
    try:
        operators = {n: OperatorInfo(n) for n in BUILTIN_OPERATORS}
        await Dags(pool, operators=operators).deploy(None, ORG, dag)
        background = asyncio.create_task(d.run_background(stop, reap_every_s=0.05))
        running = asyncio.create_task(worker.run(stop))
        run = await DagRuns(pool).trigger(
            None, ORG, "backfill", "ingest", payload={"start": 100, "end": 220}
        )
        async with asyncio.timeout(120):
            while (task := await d.get_task(run["task_id"]))["state"] not in DONE:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        stop.set()
        await asyncio.gather(background, running)
        assert task["state"] == "completed", _error(task)
        assert sorted(e["event_key"] for e in task["events"]) == [
            "range:logs:100_150",
            "range:logs:150_200",
            "range:logs:200_220",
        ]
        # one partition per chunk, all committed by the task's one attempt
        async with pool.connection() as conn:
            cur = await conn.execute(
                "SELECT range_start, range_end, attempt FROM dataset_partitions "
                "WHERE task_id = %s ORDER BY range_start",
                (run["task_id"],),
            )
            assert await cur.fetchall() == [(100, 150, 1), (150, 200, 1), (200, 220, 1)]
    finally:
        stop.set()
        await surface.close()
        await pool.close()


async def test_a_task_whose_last_chunk_fails_commits_none_of_its_chunks(
    env: Env, chain: Chain
) -> None:
    # the first chunks exist and Cryo writes them; the last one ends past the head
    task = await env.run(
        {"start": 100, "end": chain.head + 2, "chunk": 50, "rpc_url": chain.node.url}
    )
    assert task["state"] == "failed" and len(task["attempts"]) == 1
    assert "past the chain head" in _error(task)
    for name in DATATYPES:
        assert await env.live(name) == []


async def test_a_range_past_the_head_fails_the_task_for_good(env: Env, chain: Chain) -> None:
    task = await env.run({"start": 200, "end": chain.head + 2, "rpc_url": chain.node.url})
    assert task["state"] == "failed" and len(task["attempts"]) == 1
    assert "past the chain head" in _error(task)
    for name in DATATYPES:
        assert await env.live(name) == []


async def test_a_malformed_range_fails_the_task_for_good(env: Env, chain: Chain) -> None:
    task = await env.run({"start": 50, "end": 50, "rpc_url": chain.node.url})
    assert task["state"] == "failed" and len(task["attempts"]) == 1
    assert "0 <= start < end" in _error(task)


async def test_a_stopped_node_fails_retryably_and_commits_nothing(
    env: Env, fresh_node: DevNode
) -> None:
    make_activity(fresh_node.rpc(), 30)
    fresh_node.stop()
    task = await env.run({"start": 0, "end": 20, "rpc_url": fresh_node.url}, attempts=2)
    assert task["state"] == "failed" and len(task["attempts"]) == 2  # retried, then gave up
    assert "unreachable" in _error(task)
    for name in DATATYPES:
        assert await env.live(name) == []


class _StopNode(http.server.BaseHTTPRequestHandler):
    """Forwards JSON-RPC to ``node``, and stops the node at its ``stop_at``-th block request:
    the node dies mid-extract (later requests find nothing listening)."""

    protocol_version = "HTTP/1.1"
    node: DevNode
    stop_at = 5
    blocks_seen = 0
    stopped_mid_extract = False

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers["content-length"]))
        body = json.loads(raw)
        cls = type(self)
        if isinstance(body, dict) and body.get("method") == "eth_getBlockByNumber":
            cls.blocks_seen += 1
            if cls.blocks_seen == cls.stop_at:
                cls.node.stop()
                cls.stopped_mid_extract = True
        req = urllib.request.Request(
            cls.node.url, raw, headers={"content-type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                data = resp.read()
        except OSError:
            self.close_connection = True  # as a dead node: no answer
            return
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


async def test_a_node_stopped_mid_extract_fails_retryably_and_commits_nothing(
    env: Env, fresh_node: DevNode
) -> None:
    make_activity(fresh_node.rpc(), 60)
    handler = type("StopNode", (_StopNode,), {"node": fresh_node})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        task = await env.run({"start": 0, "end": 50, "rpc_url": url, "max_retries": 0}, attempts=2)
    finally:
        server.shutdown()
        server.server_close()
    assert handler.stopped_mid_extract
    assert task["state"] == "failed" and len(task["attempts"]) == 2, _error(task)
    for name in DATATYPES:  # whatever the first blocks extracted, nothing is committed
        assert await env.live(name) == []


class _Stall(http.server.BaseHTTPRequestHandler):
    """Answers eth_blockNumber, then never answers anything else (a hung extract)."""

    release = threading.Event()
    hung = False

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        if isinstance(body, dict) and body.get("method") == "eth_blockNumber":
            data = json.dumps({"jsonrpc": "2.0", "id": body["id"], "result": "0x1000"}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        type(self).hung = True
        self.release.wait(60)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def stalling_rpc() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Stall)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Stall.hung = False
    _Stall.release.clear()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        _Stall.release.set()
        server.shutdown()
        server.server_close()


class _Refuse(http.server.BaseHTTPRequestHandler):
    """Forwards JSON-RPC to ``upstream`` but refuses ``refused`` methods (-32601)."""

    protocol_version = "HTTP/1.1"  # keep-alive, as a node answers (cryo is slow without it)

    upstream = ""
    refused: frozenset[str] = frozenset()
    seen: list[str] = []

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers["content-length"]))
        body = json.loads(raw)
        calls = body if isinstance(body, list) else [body]
        self.seen.extend(c.get("method", "") for c in calls)
        if any(c.get("method") in self.refused for c in calls):
            answers = [
                {"jsonrpc": "2.0", "id": c.get("id"), "error": {"code": -32601, "message": "no"}}
                for c in calls
            ]
            data = json.dumps(answers if isinstance(body, list) else answers[0]).encode()
        else:
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


async def test_a_refused_method_fails_retryably_and_commits_nothing(env: Env, chain: Chain) -> None:
    handler = type(
        "RefuseLogs",
        (_Refuse,),
        {"upstream": chain.node.url, "refused": frozenset({"eth_getLogs"}), "seen": []},
    )
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        task = await env.run({"start": 0, "end": 50, "rpc_url": url, "max_retries": 0}, attempts=2)
    finally:
        server.shutdown()
        server.server_close()
    assert "eth_getLogs" in handler.seen
    assert task["state"] == "failed" and len(task["attempts"]) == 2  # retried, then gave up
    assert "errored" in _error(task)
    for name in DATATYPES:  # the blocks and transactions that did extract are not committed
        assert await env.live(name) == []


class _Unavailable(_Refuse):
    """Forwards JSON-RPC to ``upstream``, but answers HTTP 503 (plain text, which Cryo does not
    retry) to the first ``failures`` block requests."""

    failures = 0

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers["content-length"]))
        body = json.loads(raw)
        self.seen.append(body.get("method", "") if isinstance(body, dict) else "batch")
        if self.seen[-1] == "eth_getBlockByNumber" and type(self).failures > 0:
            type(self).failures -= 1
            self.send_response(503)
            self.send_header("content-length", "19")
            self.end_headers()
            self.wfile.write(b"Service Unavailable")
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


async def test_a_5xx_mid_extract_is_extracted_again_within_the_attempt(
    env: Env, chain: Chain
) -> None:
    handler = type(
        "Unavailable", (_Unavailable,), {"upstream": chain.node.url, "failures": 3, "seen": []}
    )
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        task = await env.run({"start": 0, "end": 50, "rpc_url": url}, attempts=2)
    finally:
        server.shutdown()
        server.server_close()
    assert handler.failures == 0  # the 503s were answered
    assert task["state"] == "completed" and len(task["attempts"]) == 1, _error(task)
    for name in DATATYPES:
        assert [(s, e) for s, e, _ in await env.live(name)] == [(0, 50)]
    (_, _, blocks_key) = (await env.live("blocks"))[0]
    assert env.rows(blocks_key) == [(n,) for n in range(50)]


async def test_a_hanging_child_is_killed_at_its_timeout(env: Env, stalling_rpc: str) -> None:
    task = await env.run(
        {"start": 0, "end": 10, "rpc_url": stalling_rpc, "extract_timeout_s": 2}, attempts=1
    )
    assert task["state"] == "failed"
    assert "cryo child killed after 2s" in _error(task)
    for name in DATATYPES:
        assert await env.live(name) == []


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie nobody reaped yet counts as dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


PARENT = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, sys.argv[1]], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
child.stdin.write(sys.argv[2].encode() + b"\\n")
child.stdin.flush()
print(child.pid, flush=True)
time.sleep(120)
"""


def test_an_extract_dies_with_its_worker(stalling_rpc: str, tmp_path: Path) -> None:
    import subprocess
    import sys
    import time

    import trace_sdk.ingest

    budget = trace_sdk.ingest.rpc_budget({}, {})
    request = json.dumps(
        {
            "start": 0,
            "end": 10,
            "rpc": stalling_rpc,
            "out": str(tmp_path),
            "datatypes": ["logs"],
            "budget": budget,
        }
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, trace_sdk.ingest._CHILD, request],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    # the child is stuck inside cryo.freeze (the RPC never answers) once it asked for the head
    deadline = time.monotonic() + 30
    while not _Stall.hung and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _Stall.hung and _alive(child)
    parent.kill()  # kill -9 of the worker mid-extract
    parent.wait()
    deadline = time.monotonic() + 30
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)
    assert list(tmp_path.iterdir()) == []  # nothing written


ECHO = """
import os, sys, time
line = sys.stdin.readline()
if line.strip() == "sleep":
    time.sleep(60)
print(os.getpid(), line.strip(), flush=True)
"""


async def test_warm_children_serve_one_request_each_and_stay_warm_to_the_high_water_mark() -> None:
    import sys

    from trace_sdk._warm_child import WarmChildren

    warm = WarmChildren([sys.executable, "-c", ECHO], max_idle=3)
    try:

        async def run_all(n: int) -> list[int]:
            answers = await asyncio.gather(
                *(warm.run(f"r{i}\n".encode(), timeout_s=30) for i in range(n))
            )
            assert [out.split()[1] for _, out in answers] == [f"r{i}".encode() for i in range(n)]
            return [int(out.split()[0]) for _, out in answers]

        first = await run_all(3)
        ready = warm.idle()
        assert len(set(first)) == 3 and len(ready) == 3  # three at once: three kept warm
        assert not set(ready) & set(first)
        second = await run_all(3)
        assert set(second) == set(ready)  # served by the warm ones, each once
        assert len(warm.idle()) == 3 and not set(warm.idle()) & set(second)
        sleeper = warm.idle()[0]  # the oldest idle child serves next
        with pytest.raises(TimeoutError):
            await warm.run(b"sleep\n", timeout_s=0.5)
        assert not _alive(sleeper)  # killed at the timeout
        assert not any(_alive(p) for p in first + second)  # each exited after its one request
    finally:
        idle = warm.idle()
        warm.close()
        assert not any(_alive(p) for p in idle)


def test_check_rows_refuses_a_missing_block_and_a_row_outside_the_range(tmp_path: Path) -> None:
    from trace_sdk.ingest import ExtractError, check_rows

    def parquet(name: str, blocks: list[int]) -> Path:
        path = tmp_path / f"{name}.parquet"
        values = ", ".join(f"({n}::UINTEGER)" for n in blocks) or "(NULL::UINTEGER)"
        where = "" if blocks else " WHERE false"
        duckdb.sql(
            f"COPY (SELECT * FROM (VALUES {values}) t(block_number){where}) "
            f"TO '{path}' (FORMAT parquet)"
        )
        return path

    blocks, logs = parquet("blocks", list(range(10))), parquet("logs", [3, 3, 9])
    empty = parquet("transactions", [])
    assert check_rows(0, 10, {"blocks": blocks, "transactions": empty, "logs": logs}) == {
        "blocks": 10,
        "transactions": 0,
        "logs": 3,
    }
    with pytest.raises(ExtractError, match=r"blocks\.parquet: 10 rows, blocks 0\.\.9"):
        check_rows(0, 11, {"blocks": blocks})  # block 10 is missing
    with pytest.raises(ExtractError, match=r"logs\.parquet: 3 rows, blocks 3\.\.9"):
        check_rows(0, 9, {"logs": logs})  # a log of block 9 is outside [0, 9)


def test_check_pieces_refuses_a_row_of_another_chunk(tmp_path: Path) -> None:
    from trace_sdk.ingest import ExtractError, Piece, check_pieces

    def parquet(name: str, blocks: list[int]) -> Path:
        path = tmp_path / f"{name}.parquet"
        values = ", ".join(f"({n}::UINTEGER)" for n in blocks)
        duckdb.sql(
            f"COPY (SELECT * FROM (VALUES {values}) t(block_number)) TO '{path}' (FORMAT parquet)"
        )
        return path

    first = Piece(0, 5, {"blocks": parquet("b0", [0, 1, 2, 3, 4]), "logs": parquet("l0", [1])})
    second = Piece(5, 10, {"blocks": parquet("b1", [5, 6, 7, 8, 9]), "logs": parquet("l1", [7])})
    assert check_pieces([first, second]) == [{"blocks": 5, "logs": 1}, {"blocks": 5, "logs": 1}]
    # a log of block 4 in the second chunk's file: inside the task's range, not its chunk's
    stray = Piece(5, 10, {"blocks": second.paths["blocks"], "logs": parquet("l2", [4, 7])})
    with pytest.raises(ExtractError, match=r"l2\.parquet: 2 rows, blocks 4\.\.7"):
        check_pieces([first, stray])
    # a blocks file with a duplicate in place of a missing block
    dup = Piece(5, 10, {"blocks": parquet("b2", [5, 6, 6, 8, 9])})
    with pytest.raises(ExtractError, match=r"b2\.parquet"):
        check_pieces([dup])
