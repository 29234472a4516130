"""The dev node and the activity generator, against a real anvil."""

from __future__ import annotations

import pytest

from trace_lite.chain.devnode import CHAIN_ID, TRANSFER_TOPIC, Chain, DevNode, RpcError


def test_the_session_chain_has_blocks_transactions_and_logs(chain: Chain) -> None:
    rpc = chain.rpc
    assert int(rpc.call("eth_chainId"), 16) == CHAIN_ID
    assert chain.head == 301  # the deploy, then 300 generated blocks
    counts = [
        len(rpc.call("eth_getBlockByNumber", hex(n), False)["transactions"])
        for n in range(1, chain.head + 1)
    ]
    assert sum(counts) == chain.activity.txs == 301
    assert counts.count(0) == 100  # one empty block in three
    logs = rpc.call("eth_getLogs", {"fromBlock": "0x0", "toBlock": "latest"})
    assert len(logs) == chain.activity.contract_calls == 100
    assert {log["topics"][0] for log in logs} == {"0x" + TRANSFER_TOPIC}
    assert {log["address"] for log in logs} == {chain.activity.contract}


def test_a_stopped_node_is_gone(fresh_node: DevNode) -> None:
    rpc = fresh_node.rpc()
    assert rpc.block_number() == 0
    fresh_node.stop()
    assert fresh_node.proc.returncode is not None
    with pytest.raises(RpcError, match="unreachable"):
        rpc.call("eth_blockNumber")
