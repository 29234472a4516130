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


def test_a_node_persists_no_state_to_disk_and_stop_removes_its_directory(
    fresh_node: DevNode,
) -> None:
    # Without --prune-history anvil writes historical states to its cache path once it holds more
    # than a few hundred blocks, and nothing ever removes them (long runs filled the disk).
    cache_dir = fresh_node.cache_dir
    assert cache_dir is not None and cache_dir.is_dir()
    rpc = fresh_node.rpc()
    for _ in range(3):
        rpc.call("anvil_mine", hex(200))
    assert rpc.block_number() == 600
    assert list(cache_dir.rglob("*")) == []
    fresh_node.stop()
    assert not cache_dir.exists()
