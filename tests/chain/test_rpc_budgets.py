"""RPC budgets per worker-pool slot, checked at a logging JSON-RPC proxy in front of a real anvil
node: each slot's endpoint carries its own key (from the slot's ``secret_env``), its own rate
limit and backoff; a throttled slot backs off and completes without failing its task, and does
not hold up the other slot."""

from __future__ import annotations

import asyncio
import http.server
import itertools
import json
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from pg_sql import sql
from trace_core.dag import OperatorInfo
from trace_core.lifecycle import RetryPolicy
from trace_core.secret_names import org_secret
from trace_core.testing import MemoryQueue, MemorySecretStore, MemorySigner
from trace_lite.chain.devnode import Chain
from trace_lite.dag_runs import DagRuns
from trace_lite.dags import Dags
from trace_lite.dispatcher import Dispatcher, open_pool
from trace_lite.local_store import LocalObjectStore
from trace_lite.task_surface import InProcessTaskSurface
from trace_sdk import BUILTIN_OPERATORS, NonRetryableError, Worker
from trace_sdk.ingest import rpc_budget

ORG = "acme"
KEYS = ("key-a-0123", "key-b-4567")


@attrs.define
class Request:
    key: str
    method: str
    params: list[Any]
    status: int
    at: float


@attrs.define
class Proxy:
    """A JSON-RPC proxy on loopback: the key is the URL's path; every request is logged with
    the status it was answered; keys in ``throttle`` get HTTP 429 while it is set."""

    upstream: str
    url: str = ""
    log: list[Request] = attrs.field(factory=list)
    throttle: set[str] = attrs.field(factory=set)
    lock: threading.Lock = attrs.field(factory=threading.Lock)

    def handle(self, path: str, raw: bytes) -> tuple[int, bytes]:
        body = json.loads(raw)
        calls = body if isinstance(body, list) else [body]
        key = path.strip("/")
        status = 429 if key in self.throttle else 200
        with self.lock:
            for c in calls:
                self.log.append(
                    Request(key, c.get("method", ""), c.get("params") or [], status, time.time())
                )
        if status == 429:
            return 429, b"Too Many Requests"
        if key not in KEYS:
            return 401, b"unknown key"
        req = urllib.request.Request(
            self.upstream, raw, headers={"content-type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            return 200, resp.read()

    def requests(self, key: str) -> list[Request]:
        with self.lock:
            return [r for r in self.log if r.key == key]


@pytest.fixture
def proxy(chain: Chain) -> Iterator[Proxy]:
    state = Proxy(chain.node.url)

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers["content-length"]))
            status, data = state.handle(self.path, raw)
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
async def pool(db_url: str) -> AsyncIterator[Any]:
    pool = await open_pool(db_url, min_size=2, max_size=12)
    try:
        yield pool
    finally:
        await pool.close()


def _dag(url: str) -> dict[str, Any]:
    """Two slots of one pool: the same endpoint with each slot's key in the path (a secret).
    Slot 0 backs off from 200 ms for up to 8 rounds; slot 1 is limited to 10 requests/s."""
    endpoint = url + "/{RPC_API_KEY}"
    return {
        "name": "budgets",
        "worker_pools": {
            "rpc": [
                {
                    "env": {
                        "RPC_URL": endpoint,
                        "RPC_INITIAL_BACKOFF_MS": "200",
                        "RPC_THROTTLE_RETRIES": "8",
                    },
                    "secret_env": {"RPC_API_KEY": "rpc/key-a"},
                },
                {
                    "env": {"RPC_URL": endpoint, "RPC_REQUESTS_PER_SECOND": "10"},
                    "secret_env": {"RPC_API_KEY": "rpc/key-b"},
                },
            ]
        },
        "jobs": {
            "ingest": {
                "operator": "cryo_ingest",
                "config": {"datasets": {"blocks": "b_blocks", "logs": "b_logs"}},
                "worker_pool": "rpc",
                "timeout": "2m",
                "max_attempts": 3,
                "triggers": [{"type": "manual"}],
                "outputs": [
                    {"storage": "object_store", "update_strategy": "append"},
                    {"storage": "object_store", "update_strategy": "append"},
                ],
            }
        },
        "publish": [
            {"job": "ingest", "output": 0, "dataset": "b_blocks"},
            {"job": "ingest", "output": 1, "dataset": "b_logs"},
        ],
    }


def _blocks_asked(requests: list[Request]) -> set[int]:
    """The block numbers a key's requests asked for (by number, receipts or a logs range)."""
    asked: set[int] = set()
    for r in requests:
        if r.method in ("eth_getBlockByNumber", "eth_getBlockReceipts") and r.params:
            asked.add(int(r.params[0], 16))
        elif r.method == "eth_getLogs" and r.params:
            f = r.params[0]
            asked.update(range(int(f["fromBlock"], 16), int(f["toBlock"], 16) + 1))
    return asked


async def test_each_slot_uses_its_own_key_and_budget_and_a_throttled_slot_holds_up_no_other(
    pool: Any, db_url: str, tmp_path: Path, chain: Chain, proxy: Proxy
) -> None:
    operators = {n: OperatorInfo(n) for n in BUILTIN_OPERATORS}
    await Dags(pool, operators=operators).deploy(None, ORG, _dag(proxy.url))
    (org_id,) = sql(db_url, "SELECT org_id::text FROM orgs WHERE name = %s", (ORG,))[0]
    secrets = MemorySecretStore()
    for name, key in zip(("rpc/key-a", "rpc/key-b"), KEYS, strict=True):
        await secrets.put(org_secret(org_id, name), key.encode())
    store = LocalObjectStore(tmp_path / "objects", "http://127.0.0.1:1", b"s" * 32)
    queue = MemoryQueue("tasks")
    d = Dispatcher(
        pool,
        signer=MemorySigner(),
        queue=queue,
        object_store=store,
        retry=RetryPolicy(max_attempts=3, base_s=0.0),
        rand=lambda: 0.5,
    )
    surface = InProcessTaskSurface(d)
    worker = Worker(
        surface=surface,
        queue=queue,
        operators=dict(BUILTIN_OPERATORS),
        store=store,
        secrets=secrets,
        wait_s=0.1,
    )
    # slot 0's key is throttled (HTTP 429, which Cryo itself does not retry) until the other
    # slot's task has completed: that task cannot wait on the throttled one
    proxy.throttle.add(KEYS[0])
    runs = DagRuns(pool)
    ranges = [(0, 30), (30, 60)]
    stop = asyncio.Event()
    background = asyncio.create_task(d.run_background(stop, reap_every_s=0.05))
    running = asyncio.create_task(worker.run(stop))
    order: list[str] = []
    try:
        ids = [
            (await runs.trigger(None, ORG, "budgets", "ingest", payload={"start": s, "end": e}))[
                "task_id"
            ]
            for s, e in ranges
        ]
        async with asyncio.timeout(120):
            while len(order) < 2:
                for task_id in ids:
                    task = await d.get_task(task_id)
                    assert task["state"] != "failed", task["attempts"]
                    if task["state"] == "completed" and task_id not in order:
                        order.append(task_id)
                        proxy.throttle.clear()
                await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.gather(background, running)
        await surface.close()
    tasks = [await d.get_task(task_id) for task_id in order]
    first, second = tasks
    # the unthrottled slot finished while the other slot was still answered 429
    assert (first["result"]["slot"], second["result"]["slot"]) == (1, 0)
    assert first["result"]["throttled"] == 0 and second["result"]["throttled"] >= 1
    assert [len(t["attempts"]) for t in tasks] == [1, 1]  # backed off inside its attempt
    by_slot = {t["result"]["slot"]: (t["result"]["start"], t["result"]["end"]) for t in tasks}

    a, b = proxy.requests(KEYS[0]), proxy.requests(KEYS[1])
    assert {r.key for r in proxy.log} == set(KEYS)  # no request without a slot's key
    # each key asked only for the blocks of the attempt holding its slot
    for requests, slot in ((a, 0), (b, 1)):
        start, end = by_slot[slot]
        assert _blocks_asked(requests) == set(range(start, end))
    # slot 1 was never throttled, and its own limit (10 requests/s, burst 10) spread Cryo's
    # requests out (the child's own eth_blockNumber is not Cryo's)
    assert {r.status for r in b} == {200}
    limited = [r for r in b if r.method != "eth_blockNumber"]
    assert limited[-1].at - limited[0].at >= (len(limited) - 10) / 10 * 0.95
    # slot 0 backed off: after its first extract was refused, it asked only eth_blockNumber
    # while throttled, each time after a doubled wait, then extracted again
    refused = [r for r in a if r.status == 429]
    first_probe = next(n for n, r in enumerate(refused) if r.method == "eth_blockNumber")
    refused = refused[first_probe:]
    assert {r.method for r in refused} == {"eth_blockNumber"}
    assert 2 <= len(refused) <= 9 and a[-1].status == 200
    gaps = [y.at - x.at for x, y in itertools.pairwise(refused)]
    for n, gap in enumerate(gaps):
        assert gap >= 0.2 * 2**n * 0.95, gaps
    # both ranges committed, once each
    for name in ("b_blocks", "b_logs"):
        rows = sql(
            db_url,
            "SELECT p.range_start, p.range_end FROM dataset_partitions p "
            "JOIN dataset_versions v USING (dataset_version) "
            "JOIN datasets d ON d.dataset_uuid = v.dataset_uuid "
            "WHERE d.name = %s ORDER BY 1",
            (name,),
        )
        assert rows == ranges


@pytest.mark.parametrize(
    ("payload", "env", "expected"),
    [
        ({}, {}, {"max_retries": 2, "initial_backoff_ms": 200, "throttle_retries": 6}),
        ({"max_retries": 0}, {}, {"max_retries": 0}),
        ({"max_retries": 5}, {"RPC_MAX_RETRIES": "1"}, {"max_retries": 1}),  # the slot wins
        ({}, {"RPC_REQUESTS_PER_SECOND": "25"}, {"requests_per_second": 25}),
        ({}, {"RPC_MAX_CONCURRENT_REQUESTS": "4"}, {"max_concurrent_requests": 4}),
    ],
)
def test_a_budget_comes_from_the_slot_then_the_payload_then_defaults(
    payload: dict[str, Any], env: dict[str, str], expected: dict[str, int]
) -> None:
    budget = rpc_budget(payload, env)
    assert {k: budget[k] for k in expected} == expected
    if "RPC_REQUESTS_PER_SECOND" not in env:
        assert budget["requests_per_second"] is None


@pytest.mark.parametrize(
    ("payload", "env", "named"),
    [
        ({}, {"RPC_REQUESTS_PER_SECOND": "0"}, "the slot's RPC_REQUESTS_PER_SECOND"),
        ({}, {"RPC_MAX_RETRIES": "-1"}, "the slot's RPC_MAX_RETRIES"),
        ({}, {"RPC_INITIAL_BACKOFF_MS": "fast"}, "the slot's RPC_INITIAL_BACKOFF_MS"),
        ({"requests_per_second": 2.5}, {}, "payload.requests_per_second"),
        ({"throttle_retries": True}, {}, "payload.throttle_retries"),
    ],
)
def test_a_bad_budget_fails_the_task_for_good_naming_its_source(
    payload: dict[str, Any], env: dict[str, str], named: str
) -> None:
    with pytest.raises(NonRetryableError, match=named):
        rpc_budget(payload, env)
