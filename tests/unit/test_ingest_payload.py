"""The block range ``cryo_ingest`` and the range operators read from a payload."""

from __future__ import annotations

from typing import Any

import pytest

from trace_sdk import NonRetryableError, _cryo_child
from trace_sdk.ingest import (
    MAX_PIECES,
    MAX_RANGE,
    block_range,
    chunk_size,
    partition_key,
    pieces,
    rpc_endpoint,
)
from trace_sdk.ranges import input_range


def test_the_range_comes_from_the_payload_or_the_upstream_event() -> None:
    assert block_range({"start": 0, "end": 100}) == (0, 100)
    event = {"key": "k", "type": "range", "payload": {"start": 5, "end": 9, "dataset": "logs"}}
    assert block_range({"event": event}) == (5, 9)
    assert input_range({"event": event}) == (5, 9, "logs")
    assert input_range({"start": 1, "end": 2}) == (1, 2, None)
    assert partition_key(0, 100) == "0_100"


@pytest.mark.parametrize(
    "payload",
    [
        {},
        {"start": 0},
        {"start": 5, "end": 5},
        {"start": 9, "end": 5},
        {"start": -1, "end": 5},
        {"start": "0", "end": 5},
        {"start": 0, "end": 5.0},
        {"start": False, "end": 5},
        {"start": 0, "end": True},
        {"event": {"payload": None}},
    ],
)
def test_bad_ranges_fail_for_good(payload: dict[str, Any]) -> None:
    with pytest.raises(NonRetryableError):
        block_range(payload)
    with pytest.raises(NonRetryableError):
        input_range(payload)


def test_a_range_over_the_limit_fails_for_good() -> None:
    assert block_range({"start": 0, "end": MAX_RANGE}) == (0, MAX_RANGE)
    with pytest.raises(NonRetryableError):
        block_range({"start": 0, "end": MAX_RANGE + 1})


def test_the_endpoint_comes_from_the_payload_or_the_slot() -> None:
    slot = {"RPC_URL": "https://rpc.example/v1/{RPC_API_KEY}", "RPC_API_KEY": "k-1"}
    assert rpc_endpoint({"rpc_url": "http://127.0.0.1:8545"}, slot) == "http://127.0.0.1:8545"
    assert rpc_endpoint({}, slot) == "https://rpc.example/v1/k-1"
    with pytest.raises(NonRetryableError, match="has none"):
        rpc_endpoint({}, {"RPC_URL": slot["RPC_URL"]})
    for bad in ({}, {"RPC_URL": "file:///etc/passwd"}):
        with pytest.raises(NonRetryableError, match="must be http"):
            rpc_endpoint({}, bad)


def test_a_task_is_cut_into_chunks_from_its_start_the_last_cut_at_its_end() -> None:
    assert chunk_size({}, 0, 250) == 250  # no chunk: the whole range, one partition
    assert chunk_size({"chunk": 100}, 0, 250) == 100
    assert chunk_size({"chunk": 400}, 0, 250) == 250
    assert pieces(0, 250, 100) == [(0, 100), (100, 200), (200, 250)]
    assert pieces(50, 320, 100) == [(50, 150), (150, 250), (250, 320)]  # as Cryo cuts them
    assert pieces(0, 100, 100) == [(0, 100)]
    # the child (which cannot import the SDK) names the files by the same rule
    for start, end, chunk in [(0, 250, 100), (50, 320, 100), (7, 8, 1), (0, 8000, 2000)]:
        assert _cryo_child.pieces(start, end, chunk) == pieces(start, end, chunk)


@pytest.mark.parametrize("chunk", [0, -5, "100", 1.5, True])
def test_a_bad_chunk_fails_for_good(chunk: object) -> None:
    with pytest.raises(NonRetryableError, match="chunk"):
        chunk_size({"chunk": chunk}, 0, 10)


def test_more_chunks_than_the_limit_fail_for_good() -> None:
    assert chunk_size({"chunk": 1}, 0, MAX_PIECES) == 1
    with pytest.raises(NonRetryableError, match=f"more than {MAX_PIECES} chunks"):
        chunk_size({"chunk": 1}, 0, MAX_PIECES + 1)
