"""``examples/monad/monad.yaml`` deployed and run on real Postgres (state and data databases)
against a real anvil node: a manual ``backfill`` is split into ranges, each range runs
``cryo_ingest`` through a pool slot, its logs fan out to ``windows`` (``range_aggregator``),
``transfers`` (``erc20_transfers``, Parquet) and ``block_stats`` (buffered Postgres, through the
buffer forwarder and the Sink). Every count is checked against the node's own answers."""

from __future__ import annotations

import asyncio
from pathlib import Path

from _chain_pipeline import monad_example, run_pipeline, sql

from trace_lite.chain.devnode import TRANSFER_TOPIC, Chain

END = 300  # the backfill's range [0, END)


async def test_the_monad_dag_backfills_and_its_datasets_match_the_node(
    db_url: str, data_db_url: str, tmp_path: Path, chain: Chain
) -> None:
    assert chain.head >= END
    doc = monad_example(chain.node.url)
    doc["jobs"]["follow"]["config"]["start"] = END  # the follower takes over after the backfill
    ranges = END // 100
    async with run_pipeline(db_url, data_db_url, tmp_path, doc) as p:

        async def stored() -> int:
            return len(await p.table_rows("monad_block_stats", "block_number", "block_number"))

        await p.trigger("backfill", start=0, end=END)
        async with asyncio.timeout(120):
            while not (  # noqa: ASYNC110
                p.done("windows") == ranges
                and p.done("transfers") == ranges
                and p.done("block_stats") == 2 * ranges  # the transactions event, the logs event
                and await stored() == END
            ):
                await asyncio.sleep(0.05)
        # the backfill's ranges ran through both slots of the rpc pool (ranges = tasks), one
        # range per slot at a time (the 3 tasks were woken at once)
        assert p.done("ingest") == ranges
        slots = sql(db_url, "SELECT slot FROM pool_slot_leases WHERE pool = 'rpc' ORDER BY 1")
        assert [s for (s,) in slots] == [0, 1]
        windows = sql(
            db_url,
            "SELECT e.event_key FROM task_events e JOIN tasks t USING (task_id) "
            "WHERE t.dag_job = 'windows' ORDER BY e.event_key",
        )
        assert [w for (w,) in windows] == ["window:0_100", "window:100_200", "window:200_300"]

        # transfers: exactly the node's ERC-20 Transfer logs (three topics) of [0, END)
        node_logs = chain.rpc.call(
            "eth_getLogs",
            {"fromBlock": "0x0", "toBlock": hex(END - 1), "topics": ["0x" + TRANSFER_TOPIC]},
        )
        expected = sorted(
            (int(log["blockNumber"], 16), int(log["logIndex"], 16), int(log["data"], 16))
            for log in node_logs
            if len(log["topics"]) == 3
        )
        assert len(expected) == chain.activity.contract_calls > 0
        objects = await p.objects("monad_transfers")
        assert sorted((o["start"], o["end"]) for o in objects) == [(0, 100), (100, 200), (200, 300)]
        rows = await p.parquet_rows("monad_transfers")
        assert sorted(
            (r["block_number"], r["log_index"], int(r["value_string"])) for r in rows
        ) == (expected)
        sample = next(r for r in rows if r["block_number"] == expected[0][0])
        first = next(log for log in node_logs if int(log["blockNumber"], 16) == expected[0][0])
        assert "0x" + sample["to_address"].hex() == "0x" + first["topics"][2][-40:]
        assert "0x" + sample["from_address"].hex() == "0x" + first["topics"][1][-40:]

        # block stats: one row per block, tx and log counts and gas as the node says
        got = await p.table_rows(
            "monad_block_stats", "block_number, tx_count, gas_used, log_count", "block_number"
        )
    all_logs = chain.rpc.call("eth_getLogs", {"fromBlock": "0x0", "toBlock": hex(END - 1)})
    want = []
    for b in range(END):
        block = chain.rpc.call("eth_getBlockByNumber", hex(b), False)
        n_logs = sum(1 for log in all_logs if int(log["blockNumber"], 16) == b)
        want.append((b, len(block["transactions"]), int(block["gasUsed"], 16), n_logs))
    assert [tuple(int(x) for x in row) for row in got] == want
