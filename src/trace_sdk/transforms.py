"""The Monad example's transforms over committed ingest partitions: ``erc20_transfers`` and
``block_stats``.

Both run once per range event of ``cryo_ingest`` (the DAG fan-out hands the event under
``payload.event``) and read that range's committed Parquet partitions through a
``PartitionReader`` (the task's read grants decide what it may read: its job's declared
inputs). Decoding uses pyarrow only.

* ``erc20_transfers`` (input: the logs output) keeps the logs that are ERC-20 ``Transfer``
  events -- topic0 ``keccak("Transfer(address,address,uint256)")``, exactly three topics and
  32 bytes of data (ERC-721's Transfer has a fourth topic and no data, so it is not taken) --
  and writes them decoded as one Parquet partition ``{start}_{end}.parquet`` of
  ``config.dataset`` (columns: block_number, transaction_index, log_index, transaction_hash,
  token, from_address, to_address, value_binary (32 bytes big-endian), value_string (decimal),
  value_f64), committed with the completion like ``cryo_ingest``'s (an empty range still writes
  an empty partition, so every range is accounted for). Its completion carries a range event
  ``range:transfers:{start}_{end}`` with the row count.
* ``block_stats`` (inputs: the transactions and the logs outputs of the same ingest job) acts
  on the logs event -- the transactions of that range committed in the same completion -- and
  completes the transactions event's task with nothing to do. It publishes one row per block of
  the range (``block_number``, ``tx_count``, ``gas_used`` (the sum of the transactions'),
  ``log_count``; zeros for an empty block) as inline buffer batches scoped to the range, for
  the Sink to write into ``config.dataset`` (a buffered Postgres dataset with
  ``unique_key: [block_number]``, so a retried range writes each row once; in the example it
  is ``replace``, so the range's rows are those of its newest ``block_stats`` task: a rerun
  after a reorg replaces them).

Config: ``dataset`` (the output's dataset name); for ``block_stats`` also ``transactions`` and
``logs`` (the input dataset names to read).
"""

from __future__ import annotations

import asyncio
import io
from collections import Counter
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.parquet as pq

from trace_sdk._worker import NonRetryableError, Operator, TaskContext
from trace_sdk.ranges import input_range

#: keccak256("Transfer(address,address,uint256)")
TRANSFER_TOPIC = bytes.fromhex("ddf252ad1be2c89b69c2b068fc378daa952ba7f163c4a11628f55a4df523b3ef")
#: Rows per inline buffer batch (the inline limit is 1,000 rows).
STATS_BATCH_ROWS = 1000

TRANSFERS_SCHEMA = pa.schema(
    [
        ("block_number", pa.uint32()),
        ("transaction_index", pa.uint32()),
        ("log_index", pa.uint32()),
        ("transaction_hash", pa.binary()),
        ("token", pa.binary()),
        ("from_address", pa.binary()),
        ("to_address", pa.binary()),
        ("value_binary", pa.binary()),
        ("value_string", pa.string()),
        ("value_f64", pa.float64()),
    ]
)


class PartitionReader(Protocol):
    """Reads committed partitions for a running attempt."""

    async def read(self, task_id: str, attempt: int, dataset: str, start: int, end: int) -> bytes:
        """The committed object of partition ``[start, end)`` of ``dataset``, which the task's
        grants must let it read. Raises ``trace_core.errors.NotFound`` (no such dataset or
        not readable), ``LeaseLost`` (not the running attempt), ``Unavailable`` (the partition
        is not readable yet: retry)."""
        ...


def _dataset(payload: dict[str, Any], name: str) -> str:
    value = payload.get(name)
    if not isinstance(value, str) or not value:
        raise NonRetryableError(f"config.{name} must name a dataset")
    return value


def decode_transfers(logs_parquet: bytes) -> pa.Table:
    """The ERC-20 Transfer logs of a Cryo logs file, decoded (``TRANSFERS_SCHEMA``)."""
    logs = pq.read_table(io.BytesIO(logs_parquet)).to_pylist()
    rows: list[dict[str, Any]] = []
    for log in logs:
        if log["topic0"] != TRANSFER_TOPIC or log["topic2"] is None or log["topic3"] is not None:
            continue
        data = log["data"] or b""
        if len(data) != 32 or len(log["topic1"]) != 32 or len(log["topic2"]) != 32:
            continue
        value = int.from_bytes(data, "big")
        rows.append(
            {
                "block_number": log["block_number"],
                "transaction_index": log["transaction_index"],
                "log_index": log["log_index"],
                "transaction_hash": log["transaction_hash"],
                "token": log["address"],
                "from_address": log["topic1"][12:],
                "to_address": log["topic2"][12:],
                "value_binary": data,
                "value_string": str(value),
                "value_f64": float(value),
            }
        )
    rows.sort(key=lambda r: (r["block_number"], r["log_index"]))
    return pa.Table.from_pylist(rows, schema=TRANSFERS_SCHEMA)


def block_rows(start: int, end: int, transactions: bytes, logs: bytes) -> list[dict[str, Any]]:
    """One stats row per block of ``[start, end)`` from Cryo transactions and logs files."""
    txs = pq.read_table(io.BytesIO(transactions), columns=["block_number", "gas_used"])
    tx_count: Counter[int] = Counter()
    gas: Counter[int] = Counter()
    for block, used in zip(
        txs.column("block_number").to_pylist(), txs.column("gas_used").to_pylist(), strict=True
    ):
        tx_count[block] += 1
        gas[block] += used or 0
    log_count = Counter(
        pq.read_table(io.BytesIO(logs), columns=["block_number"]).column(0).to_pylist()
    )
    return [
        {
            "block_number": b,
            "tx_count": tx_count[b],
            "gas_used": gas[b],
            "log_count": log_count[b],
        }
        for b in range(start, end)
    ]


def make_transforms(reader: PartitionReader) -> dict[str, Operator]:
    """``erc20_transfers`` and ``block_stats`` over ``reader``."""

    async def erc20_transfers(ctx: TaskContext) -> dict[str, Any] | None:
        """Decodes one range's ERC-20 Transfer logs into a Parquet partition."""
        start, end, logs_dataset = input_range(ctx.payload)
        if logs_dataset is None:
            raise NonRetryableError("the input range event names no logs dataset")
        out = _dataset(ctx.payload, "dataset")
        data = await reader.read(ctx.task.task_id, ctx.attempt, logs_dataset, start, end)
        table = await asyncio.to_thread(decode_transfers, data)
        sink = io.BytesIO()
        pq.write_table(table, sink, compression="zstd")
        key = f"{start}_{end}"
        await ctx.stage_output(out, f"{key}.parquet", sink.getvalue(), {"start": start, "end": end})
        ctx.final_events.append(
            {
                "key": f"range:transfers:{key}",
                "type": "range",
                "payload": {
                    "start": start,
                    "end": end,
                    "partition_key": key,
                    "dataset": out,
                    "rows": table.num_rows,
                },
            }
        )
        return {"start": start, "end": end, "transfers": table.num_rows}

    async def block_stats(ctx: TaskContext) -> dict[str, Any] | None:
        """Publishes per-block stats of one range (on its logs event) as buffer batches."""
        start, end, dataset = input_range(ctx.payload)
        logs, transactions = _dataset(ctx.payload, "logs"), _dataset(ctx.payload, "transactions")
        out = _dataset(ctx.payload, "dataset")
        if dataset != logs:
            return {"skipped": f"stats are computed on the {logs} event of the range"}
        task_id, attempt = ctx.task.task_id, ctx.attempt
        tx_data = await reader.read(task_id, attempt, transactions, start, end)
        log_data = await reader.read(task_id, attempt, logs, start, end)
        rows = await asyncio.to_thread(block_rows, start, end, tx_data, log_data)
        scope = {"range": {"start": start, "end": end}}
        for i in range(0, len(rows), STATS_BATCH_ROWS):
            batch = rows[i : i + STATS_BATCH_ROWS]
            await ctx.publish_buffer(out, batch, key=f"{start}_{end}-{i}", scope=scope, inline=True)
        return {
            "start": start,
            "end": end,
            "blocks": len(rows),
            "transactions": sum(r["tx_count"] for r in rows),
            "logs": sum(r["log_count"] for r in rows),
        }

    return {"erc20_transfers": erc20_transfers, "block_stats": block_stats}


__all__ = [
    "TRANSFERS_SCHEMA",
    "TRANSFER_TOPIC",
    "PartitionReader",
    "block_rows",
    "decode_transfers",
    "make_transforms",
]
