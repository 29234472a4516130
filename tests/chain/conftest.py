"""Fixtures for chain ingest tests: a real anvil node (installed by scripts/bootstrap.sh).

``chain`` is one node per session with ~300 blocks of activity (contract calls with logs, ETH
transfers, empty blocks); tests that stop or break a node start their own (``fresh_node``).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator

import pytest

from trace_lite.chain.devnode import Chain, DevNode, anvil_path, make_activity


def _require_tools() -> None:
    try:
        anvil_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    if importlib.util.find_spec("cryo") is None:
        pytest.skip("cryo is not installed (the ingest extra: linux x86_64 only)")


@pytest.fixture(scope="session")
def chain() -> Iterator[Chain]:
    _require_tools()
    node = DevNode.start()
    try:
        rpc = node.rpc()
        activity = make_activity(rpc, 300)
        yield Chain(node, rpc, activity, rpc.block_number())
    finally:
        node.stop()


@pytest.fixture
def fresh_node() -> Iterator[DevNode]:
    _require_tools()
    node = DevNode.start()
    try:
        yield node
    finally:
        node.stop()
