"""``trace_sdk.transforms`` decoding, on Cryo-shaped Parquet built here: only ERC-20
``Transfer`` logs are taken (not ERC-721's, not other events, not malformed data), values of
any uint256 size survive, and block stats cover every block of the range."""

from __future__ import annotations

import io
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from trace_sdk.transforms import TRANSFER_TOPIC, block_rows, decode_transfers

FROM = bytes(12) + bytes.fromhex("aa" * 20)
TO = bytes(12) + bytes.fromhex("bb" * 20)
TOKEN = bytes.fromhex("cc" * 20)


def _parquet(rows: list[dict[str, Any]], schema: pa.Schema) -> bytes:
    out = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), out)
    return out.getvalue()


LOGS = pa.schema(
    [
        ("block_number", pa.uint32()),
        ("transaction_index", pa.uint32()),
        ("log_index", pa.uint32()),
        ("transaction_hash", pa.binary()),
        ("address", pa.binary()),
        ("topic0", pa.binary()),
        ("topic1", pa.binary()),
        ("topic2", pa.binary()),
        ("topic3", pa.binary()),
        ("data", pa.binary()),
    ]
)


def log(block: int, index: int, **fields: Any) -> dict[str, Any]:
    row = {
        "block_number": block,
        "transaction_index": 0,
        "log_index": index,
        "transaction_hash": bytes([index]) * 32,
        "address": TOKEN,
        "topic0": TRANSFER_TOPIC,
        "topic1": FROM,
        "topic2": TO,
        "topic3": None,
        "data": (2**256 - 1).to_bytes(32, "big"),
    }
    return row | fields


def test_only_erc20_transfers_are_decoded() -> None:
    logs = [
        log(7, 3, data=(5).to_bytes(32, "big")),
        log(5, 1),  # the largest uint256
        log(5, 2, topic3=bytes(32), data=b""),  # ERC-721 Transfer: the token id is a topic
        log(6, 0, topic0=bytes(32)),  # another event
        log(6, 1, data=b"\x01"),  # malformed data
        log(6, 2, topic2=None),  # two topics only
    ]
    table = decode_transfers(_parquet(logs, LOGS))
    rows = table.to_pylist()
    assert [(r["block_number"], r["log_index"]) for r in rows] == [(5, 1), (7, 3)]
    first = rows[0]
    assert first["token"] == TOKEN
    assert first["from_address"] == bytes.fromhex("aa" * 20)
    assert first["to_address"] == bytes.fromhex("bb" * 20)
    assert first["value_string"] == str(2**256 - 1)
    assert rows[1]["value_string"] == "5" and rows[1]["value_f64"] == 5.0


def test_an_empty_range_decodes_to_an_empty_table_with_the_schema() -> None:
    table = decode_transfers(_parquet([], LOGS))
    assert table.num_rows == 0 and "value_string" in table.column_names


def test_block_stats_cover_every_block_of_the_range() -> None:
    txs = _parquet(
        [
            {"block_number": 10, "gas_used": 21_000},
            {"block_number": 10, "gas_used": 30_000},
            {"block_number": 12, "gas_used": 21_000},
        ],
        pa.schema([("block_number", pa.uint32()), ("gas_used", pa.uint64())]),
    )
    logs = _parquet([log(10, 0), log(12, 0), log(12, 1)], LOGS)
    assert block_rows(10, 14, txs, logs) == [
        {"block_number": 10, "tx_count": 2, "gas_used": 51_000, "log_count": 1},
        {"block_number": 11, "tx_count": 0, "gas_used": 0, "log_count": 0},
        {"block_number": 12, "tx_count": 1, "gas_used": 21_000, "log_count": 2},
        {"block_number": 13, "tx_count": 0, "gas_used": 0, "log_count": 0},
    ]
