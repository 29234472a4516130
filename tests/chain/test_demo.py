"""``trace demo`` (the README's first command) run briefly as a real process -- Dispatcher,
worker, sink and the Monad DAG over real Postgres -- against a 0.4 s anvil chain this test
owns, then the chain checked by the test itself: the summary's counts (read by the demo
through the Query Service) equal the node's own, and the follower ingested blocks past the
backfilled history."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from trace_lite.chain.devnode import TRANSFER_TOPIC, DevNode, Rpc

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def live_node(fresh_node: DevNode) -> Iterator[DevNode]:
    fresh_node.stop()  # the fixture's node mines per transaction; this one every 0.4 s
    node = DevNode.start(block_time_s=0.4)
    try:
        yield node
    finally:
        node.stop()


def demo_env(db_url: str, data_db_url: str, tmp_path: Path) -> dict[str, str]:
    """The demo's environment: the test's databases, a free Dispatcher port."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACE_")}
    env.update(
        TRACE_HOME=str(tmp_path / "home"),
        TRACE_DATABASE_URL=db_url,
        TRACE_DATA_DATABASE_URL=data_db_url,
        TRACE_DISPATCHER_URL=f"http://127.0.0.1:{_free_port()}",
        TRACE_PLATFORM_TOKEN="demo-test-token-" + "x" * 32,
        TRACE_RETRY_BASE_S="0.2",
        PYTHONPATH=os.pathsep.join([str(REPO / "src"), str(REPO / "servers")]),
    )
    return env


def node_counts(rpc: Rpc, end: int) -> dict[str, int]:
    txs = sum(
        len(rpc.call("eth_getBlockByNumber", hex(b), False)["transactions"]) for b in range(end)
    )
    logs = rpc.call("eth_getLogs", {"fromBlock": "0x0", "toBlock": hex(end - 1)})
    transfers = [
        log for log in logs if log["topics"][0] == "0x" + TRANSFER_TOPIC and len(log["topics"]) == 3
    ]
    return {"blocks": end, "transactions": txs, "logs": len(logs), "transfers": len(transfers)}


def test_the_demo_ingests_a_live_chain_and_its_summary_matches_the_node(
    live_node: DevNode, db_url: str, data_db_url: str, tmp_path: Path
) -> None:
    out = tmp_path / "summary.json"
    env = demo_env(db_url, data_db_url, tmp_path)
    argv = [
        sys.executable, "-m", "trace_servers.cli", "demo", "--rpc-url", live_node.url,
        "--history", "250", "--duration", "12", "--drain", "120", "--workers", "1",
        "--summary-json", str(out),
    ]  # fmt: skip
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        output, _ = proc.communicate(timeout=280)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)  # the demo stops its children by PID
        output, _ = proc.communicate(timeout=60)
        pytest.fail("the demo did not end: " + output.decode()[-3000:])
    text = output.decode()
    assert proc.returncode == 0, text[-3000:]
    assert "demo OK" in text
    summary: dict[str, Any] = json.loads(out.read_text())
    assert summary["complete"] and summary["matches_node"]
    start, end = summary["blocks_covered"]
    # the demo froze the chain; the test asks the node itself
    assert start == 0 and summary["datasets"] == node_counts(live_node.rpc(), end)
    assert summary["block_stats"] == {
        k: summary["datasets"][k] for k in ("blocks", "transactions", "logs")
    }
    # history [0, 200) was backfilled; the follower took the live blocks after it
    assert summary["backfill_end"] == 200
    assert summary["follower_cursor"] == end > 200
    assert summary["datasets"]["transfers"] > 0 and summary["sample_transfers"]
    assert summary["tasks"]["failed"] == 0
    # the demo planted one large token transfer: the large_transfers detector's alert event
    # (gas_spikes raises none: the activity's blocks stay far below 500,000 gas); the demo
    # routes to no destination, so nothing is delivered
    assert summary["alerts"] == {"events": 1, "deliveries": {}}
    assert "alerts: 1 alert events" in text
    assert set(summary["versions"]) == {
        "monad_blocks",
        "monad_transactions",
        "monad_logs",
        "monad_transfers",
        "monad_block_stats",
    }


def test_ctrl_c_ends_the_demo_with_a_summary_and_every_child_stopped(
    db_url: str, data_db_url: str, tmp_path: Path, fresh_node: DevNode
) -> None:
    fresh_node.stop()  # only to skip without anvil: the demo starts its own node
    env = demo_env(db_url, data_db_url, tmp_path)
    argv = [
        sys.executable, "-m", "trace_servers.cli", "demo", "--duration", "0",
        "--history", "150", "--workers", "1",
    ]  # fmt: skip
    proc = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout or ()), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        # a progress line with the backfill done: the demo is following the head
        while not any(line.startswith("backfill 1/1") for line in lines):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)[-3000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=200)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(10)
    text = "".join(lines)
    assert proc.returncode == 0, text[-3000:]
    assert "demo OK" in text and "stopped" in text
    pids = [int(p) for p in re.findall(r"\((?:pid|chain id \d+, anvil pid) (\d+)\)", text)]
    assert len(pids) >= 4  # anvil, the dispatcher, the worker, the sink
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
