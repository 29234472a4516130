"""A forced reorg on a real anvil node (``evm_snapshot``, a fork mined, ``evm_revert``, a
different fork mined) under ``examples/monad/monad.yaml`` on real Postgres: the follower sees
the changed hashes, announces exactly the affected ranges again, ``cryo_ingest`` replaces them,
``erc20_transfers`` and ``block_stats`` rerun on them once, and ``windows``
(``range_aggregator``) announces the already announced window holding a reorged range again, so
its downstream job reruns on the new data; the published logs, transfers and block stats and
the window's aggregate then equal the node's new chain, and the ranges below the fork are not
extracted again."""

from __future__ import annotations

import asyncio
import hashlib
import http.server
import io
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs
import pyarrow.parquet as pq
from _chain_pipeline import ORG, Pipeline, monad_example, run_pipeline, sql

from trace_core.access import UserCaller
from trace_lite.chain.devnode import TRANSFER_TOPIC, DevNode, Rpc, make_activity
from trace_lite.datasets import Datasets
from trace_lite.outputs import INVALIDATE_TOPIC
from trace_sdk import Operator, TaskContext
from trace_sdk.block_hashes import hex_hashes_digest
from trace_sdk.follower import CommittedRange, reorged_ranges, stale_ranges
from trace_sdk.ranges import input_range


def test_reorged_ranges_start_at_the_chunk_of_the_lowest_changed_block() -> None:
    remembered = tuple((b, f"h{b}") for b in range(40, 60))
    same = {b: h for b, h in remembered}
    assert reorged_ranges(remembered, same, cursor=60, chunk=20) == ((), False)
    forked = {**same, 47: "x", 52: "y", 59: None}
    assert reorged_ranges(remembered, forked, cursor=60, chunk=20) == (((40, 60),), False)
    deep = {**same, 40: "x"}  # the lowest remembered block: the fork may be below the window
    assert reorged_ranges(remembered, deep, cursor=80, chunk=20) == (((40, 60), (60, 80)), True)


def test_stale_ranges_compare_committed_digests_with_the_node_and_skip_awaited_ones() -> None:
    node: dict[int, str | None] = {b: "0x" + f"{b:064x}" for b in range(0, 60)}
    digest = hex_hashes_digest(f"{b:064x}" for b in range(20, 40))
    good = CommittedRange(20, 40, 7, digest)
    other = CommittedRange(40, 60, 8, digest)  # another range's digest: stale
    unknown = CommittedRange(0, 20, 6, None)  # committed before digests were recorded
    assert stale_ranges([unknown, good, other], node, {}) == ([(40, 60)], [(20, 40)])
    # its re-extract has not committed yet (the same partition is live): not announced again
    assert stale_ranges([other], node, {(40, 60): 8}) == ([], [])
    assert stale_ranges([other], node, {(40, 60): -1}) == ([(40, 60)], [])
    # a block the node does not have (a shorter fork) differs too
    assert stale_ranges([good], {**node, 33: None}, {}) == ([(20, 40)], [])


def node_stats(rpc: Rpc, end: int) -> list[tuple[int, int, int, int]]:
    """``(block, tx count, gas used, log count)`` of blocks ``[0, end)`` as the node says."""
    logs = rpc.call("eth_getLogs", {"fromBlock": "0x0", "toBlock": hex(end - 1)})
    out = []
    for b in range(end):
        block = rpc.call("eth_getBlockByNumber", hex(b), False)
        n_logs = sum(1 for log in logs if int(log["blockNumber"], 16) == b)
        out.append((b, len(block["transactions"]), int(block["gasUsed"], 16), n_logs))
    return out


async def assert_datasets_match_the_node(p: Pipeline, rpc: Rpc, end: int) -> None:
    """Every published dataset of ``[0, end)`` -- logs, transfers (Parquet, 20-block ranges)
    and block stats (buffered Postgres) -- equals the node's chain now."""
    node_logs = rpc.call("eth_getLogs", {"fromBlock": "0x0", "toBlock": hex(end - 1)})
    want_logs = sorted(
        (int(x["blockNumber"], 16), int(x["logIndex"], 16), x["transactionHash"]) for x in node_logs
    )
    want_transfers = sorted(
        (int(x["blockNumber"], 16), int(x["logIndex"], 16), x["transactionHash"])
        for x in node_logs
        if x["topics"][0] == "0x" + TRANSFER_TOPIC and len(x["topics"]) == 3
    )
    ranges = [(s, s + 20) for s in range(0, end, 20)]
    for dataset, want in (("monad_logs", want_logs), ("monad_transfers", want_transfers)):
        assert sorted((o["start"], o["end"]) for o in await p.objects(dataset)) == ranges
        got = sorted(
            (r["block_number"], r["log_index"], "0x" + r["transaction_hash"].hex())
            for r in await p.parquet_rows(dataset)
        )
        assert got == want, dataset
    stats = await p.table_rows(
        "monad_block_stats", "block_number, tx_count, gas_used, log_count", "block_number"
    )
    assert [tuple(int(x) for x in row) for row in stats] == node_stats(rpc, end)


async def follow(p: Pipeline, run_id: str) -> list[str]:
    """One follower run; waits until it completed and the ranges it announced were ingested,
    decoded and their block stats stored (``n`` announced: as many more ingest and transfers
    tasks, twice as many block stats tasks, the sink idle); returns the run's event keys."""
    before = p.done("ingest")
    follower = await p.trigger("follow", run_id)
    async with asyncio.timeout(90):
        while await p.state_of(follower) != "completed":  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    events = p.event_keys(follower)
    n = before + len(events)
    await p.until(
        lambda: (
            p.done("ingest") == n
            and p.done("transfers") == n
            and p.done("block_stats") == 2 * n  # its transactions and logs events
            and p.buffers_idle()
        ),
        timeout_s=90,
    )
    return events


def logs_digest(logs: list[tuple[int, int, str]]) -> dict[str, Any]:
    """A window's aggregate: how many logs, and a digest of their (block, index, tx hash)."""
    text = "\n".join(f"{b}:{i}:{h}" for b, i, h in sorted(logs))
    return {"logs": len(logs), "sha256": hashlib.sha256(text.encode()).hexdigest()}


def node_window(rpc: Rpc, start: int, end: int) -> dict[str, Any]:
    logs = rpc.call("eth_getLogs", {"fromBlock": hex(start), "toBlock": hex(end - 1)})
    return logs_digest(
        [(int(x["blockNumber"], 16), int(x["logIndex"], 16), x["transactionHash"]) for x in logs]
    )


def window_logs(p: Pipeline) -> dict[str, Operator]:
    """``window_logs``: a window's downstream job, the aggregate of the committed logs of the
    window's ranges (``logs_digest``) as its result. It waits for every committed partition of
    ``monad_logs`` to be promoted, so it reads what was committed before its window event."""

    async def window_logs(ctx: TaskContext) -> dict[str, Any] | None:
        start, end, _ = input_range(ctx.payload)
        org_id = sql(p.db_url, "SELECT org_id::text FROM orgs WHERE name = %s", (ORG,))[0][0]
        admin = UserCaller("alice", org_id, frozenset({"admin"}))
        async with asyncio.timeout(30):
            while True:
                res = await Datasets(p.state, object_store=p.store).resolve(
                    admin, ORG, ["monad_logs"], pin_ttl_s=0
                )
                if not res.datasets[0].pending:
                    break
                await asyncio.sleep(0.05)
        logs = []
        for obj in res.datasets[0].objects:
            if start <= obj["start"] and obj["end"] <= end:
                table = pq.read_table(io.BytesIO(await p.store.get(obj["object_key"])))
                logs += [
                    (r["block_number"], r["log_index"], "0x" + r["transaction_hash"].hex())
                    for r in table.to_pylist()
                ]
        return {"start": start, "end": end, **logs_digest(logs)}

    return {"window_logs": window_logs}


def window_results(db_url: str) -> list[tuple[str, dict[str, Any]]]:
    """``(window, result)`` of each completed ``window_logs`` task, in creation order."""
    rows = sql(
        db_url,
        "SELECT (result ->> 'start') || '_' || (result ->> 'end'), result FROM tasks "
        "WHERE dag_job = 'window_logs' AND state = 'completed' ORDER BY created_at, task_id",
    )
    return [(w, {"logs": r["logs"], "sha256": r["sha256"]}) for w, r in rows]


async def test_a_forced_reorg_replaces_exactly_the_affected_range(
    db_url: str, data_db_url: str, tmp_path: Path, fresh_node: DevNode
) -> None:
    rpc = fresh_node.rpc()
    make_activity(rpc, 45)  # blocks 0..46
    snapshot = rpc.call("evm_snapshot")
    make_activity(rpc, 40)  # fork A: 47..
    assert 82 <= rpc.block_number() < 102
    doc = monad_example(fresh_node.url)
    doc["jobs"]["follow"]["config"].update(start=0, chunk=20, confirmations=2)
    # windows of 60 blocks: 0_60 is announced with 40_60, below the last range taken (60_80),
    # and 40_60 is the range the reorg changes; window_logs aggregates each window's logs
    doc["jobs"]["windows"]["config"]["blocks"] = 60
    doc["jobs"]["windows"]["outputs"] = [
        {"storage": "object_store", "update_strategy": "append", "schema": {"start": "uint64"}}
    ]
    doc["jobs"]["window_logs"] = {
        "operator": "window_logs",
        "max_attempts": 3,
        "inputs": [{"from": {"job": "windows", "output": 0}}],
    }
    async with run_pipeline(db_url, data_db_url, tmp_path, doc, operators=window_logs) as p:
        assert await follow(p, "one") == [
            "range:0_20",
            "range:20_40",
            "range:40_60",
            "range:60_80",
        ]
        await p.until(lambda: p.done("windows") == 4 and p.done("window_logs") == 1)
        assert window_results(db_url) == [("0_60", node_window(rpc, 0, 60))]
        fork_a = node_stats(rpc, 80)
        rpc.call("evm_revert", snapshot)
        # fork B, still shorter than what was announced: the follower waits for it to grow
        rpc.call("evm_mine")  # fork B differs from A from block 47 on, in shape too
        assert await follow(p, "waits") == []
        make_activity(rpc, 40)
        assert 82 <= rpc.block_number() < 102
        assert node_stats(rpc, 80) != fork_a  # the stats of 47..79 changed
        # exactly the ranges from the one holding the fork up to the cursor again
        assert await follow(p, "two") == ["reorg:40_60", "reorg:60_80"]
        # the replace commit announced an invalidation; once the cascade consumed it, it has
        # created nothing: the re-extract's own range events already reran the transforms
        await p.until(
            lambda: (
                not sql(
                    db_url,
                    "SELECT count(*) FROM outbox WHERE topic = %s AND state = 'pending'",
                    (INVALIDATE_TOPIC,),
                )[0][0]
            )
        )
        invalidations = sql(
            db_url, "SELECT count(*) FROM outbox WHERE topic = %s", (INVALIDATE_TOPIC,)
        )
        assert invalidations[0][0] >= 1
        # windows: 0_60 (built from 40_60) announced again, once; 60_80 is in the open window
        await p.until(lambda: p.done("windows") == 6 and p.done("window_logs") == 2)
        await asyncio.sleep(0.2)
        assert p.done("transfers") == 6 and p.done("ingest") == 6
        assert p.done("window_logs") == 2
        announced = sql(
            db_url,
            "SELECT e.event_key FROM task_events e JOIN tasks t USING (task_id) "
            "WHERE t.dag_job = 'windows' ORDER BY t.created_at, e.seq",
        )
        assert [k for (k,) in announced] == ["window:0_60", "window:0_60"]
        # the window's aggregate was rebuilt from the new chain's data
        (first, before), (again, after) = window_results(db_url)
        assert first == again == "0_60" and before != after
        assert after == node_window(rpc, 0, 60)
        await assert_datasets_match_the_node(p, rpc, 80)

    extracted = sql(
        db_url,
        "SELECT t.result ->> 'start', count(*) FROM tasks t WHERE t.dag_job = 'ingest' GROUP BY 1",
    )
    assert sorted((int(s), n) for s, n in extracted) == [(0, 1), (20, 1), (40, 2), (60, 2)]


@attrs.define
class Switch:
    """A JSON-RPC proxy on loopback that forwards every request to ``upstream``, which a test
    changes: the ingest slots' endpoint serving another fork for a while."""

    upstream: str
    url: str = ""


@contextmanager
def switch_proxy(upstream: str) -> Iterator[Switch]:
    state = Switch(upstream)

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers["content-length"]))
            req = urllib.request.Request(
                state.upstream, raw, headers={"content-type": "application/json"}
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

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


async def test_an_extract_that_saw_another_fork_is_found_and_extracted_again(
    db_url: str, data_db_url: str, tmp_path: Path, fresh_node: DevNode
) -> None:
    """The race: the follower reads fork A's hashes, the extract then sees fork B, and the
    node shows A again at the follower's next run -- a short-lived fork, or an ingest slot's
    node on another fork. Comparing the node with its own earlier reads the follower sees no
    change; comparing it with what was committed (the blocks event's digest) it does."""
    rpc = fresh_node.rpc()
    make_activity(rpc, 45)  # blocks 0..46, the history both forks share
    make_activity(rpc, 30)  # fork A (the node's chain throughout): 47..77
    other = DevNode.start(fork_url=fresh_node.url, fork_block=46)
    try:
        make_activity(other.rpc(), 30)  # fork B: 47..77 of its own
        assert (
            other.rpc().call("eth_getBlockByNumber", hex(46), False)["hash"]
            == rpc.call("eth_getBlockByNumber", hex(46), False)["hash"]
        )
        with switch_proxy(other.url) as switch:
            doc = monad_example(fresh_node.url, rpc_urls={"rpc": switch.url})
            doc["jobs"]["follow"]["config"].update(start=0, chunk=20, confirmations=2)
            async with run_pipeline(db_url, data_db_url, tmp_path, doc) as p:
                # the follower reads A; between its read and the extract the chain the
                # extract sees is B
                assert await follow(p, "one") == [
                    "range:0_20",
                    "range:20_40",
                    "range:40_60",
                ]
                switch.upstream = fresh_node.url  # ... and A again from now on
                make_activity(rpc, 10)
                assert rpc.block_number() >= 82
                # 40_60 was committed from B: extracted again; 0_20 and 20_40 (the shared
                # history) check out and are not
                assert await follow(p, "two") == ["reorg:40_60", "range:60_80"]
                assert await follow(p, "three") == []  # all of it checks out now
                await assert_datasets_match_the_node(p, rpc, 80)
    finally:
        other.stop()
    extracted = sql(
        db_url,
        "SELECT t.result ->> 'start', count(*) FROM tasks t WHERE t.dag_job = 'ingest' GROUP BY 1",
    )
    assert sorted((int(s), n) for s, n in extracted) == [(0, 1), (20, 1), (40, 2), (60, 1)]
