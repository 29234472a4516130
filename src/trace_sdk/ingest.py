"""Chain ingest operators: ``cryo_ingest`` (blocks, transactions and logs of a block range).

Ranges
------
One rule everywhere in Trace: a block range is half-open, ``[start, end)``. A task's payload,
a partition (``{"start", "end"}``), a range event and an object name (``{start}_{end}``) all
carry the exclusive ``end``. Cryo's ``blocks=["start:end"]`` is end-exclusive too, but its file
names end inclusively (``..._{start:08d}_to_{end - 1:08d}.parquet``); those names never leave
the child process: ``cryo_ingest`` stages each file as ``{start}_{end}.parquet``.

``cryo_ingest``
---------------
Payload (a job's ``config`` merged with the trigger's payload, or an upstream range event's
``payload`` under ``event``)::

    start, end          the range [start, end); end - start <= MAX_RANGE
    chunk               blocks per partition (default: the whole range): the range is
                        extracted by ONE Cryo call in chunks of this many blocks from
                        ``start`` (Cryo extracts them concurrently) and committed as one
                        partition per chunk, ``[start, start + chunk)``, ..., the last cut at
                        ``end`` (``pieces``); at most MAX_PIECES chunks
    rpc_url             the node's JSON-RPC endpoint; without it, the worker-pool slot's
                        ``RPC_URL`` (env), where ``{RPC_API_KEY}`` is replaced by the slot's
                        ``RPC_API_KEY`` (secret_env); a payload URL is stored with the task, so
                        keys belong in the slot
    datasets            {"blocks": name, "transactions": name, "logs": name} (defaults: the
                        datatype names); a subset extracts only those datatypes; the
                        job's outputs are the named ones in the order blocks, transactions,
                        logs (the mapping's own order is not kept by the job's stored config)
    extract_timeout_s   kill the child after this long (default: 90% of the task's timeout)
    requests_per_second, max_concurrent_requests, max_retries, initial_backoff_ms,
    throttle_retries    the RPC budget when the attempt holds no worker-pool slot (below)

RPC budgets
-----------
A worker-pool slot is one endpoint and one key (``RPC_URL``, ``RPC_API_KEY``), held by one
attempt at a time, so its budget is the budget of that attempt's extract. A slot's ``env`` may
set (positive integers; a slot's value wins over the payload's, the payload's over the
default):

    RPC_REQUESTS_PER_SECOND       Cryo's request rate limit (default: none)
    RPC_MAX_CONCURRENT_REQUESTS   Cryo's concurrent requests (default: Cryo's)
    RPC_MAX_RETRIES               Cryo's retries of one request the endpoint answered with a
                                  JSON-RPC rate-limit error (default 2)
    RPC_INITIAL_BACKOFF_MS        Cryo's wait before such a retry, and the child's first wait
                                  after an HTTP 429/5xx (default 200; doubled each time, at
                                  most 30 s)
    RPC_THROTTLE_RETRIES          how many times the child backs off and extracts again after
                                  HTTP 429/5xx before the attempt fails retryably (default 6)

Each attempt's extract is its own child process with its own limiter and backoff: a slot that
is throttled slows only the attempt holding it (``_cryo_child``'s docstring has the details).

The extract runs in a child process (the script ``trace_sdk/_cryo_child.py``, started warm
and used once: ``trace_sdk._warm_child``; killed at ``extract_timeout_s`` or when the attempt is
cancelled): one ``cryo.freeze`` of the whole range into a private temporary directory, checked
by the child and by ``check_pieces`` (``n_errored`` = 0, one file per chunk and datatype and no
other, every row inside its chunk, one blocks row per block). Only after the whole child
succeeded and every chunk's files passed are any files staged (``TaskContext.stage_output``),
so a failed extract, or one bad chunk among many, commits nothing; the outputs commit with the
completion, one partition ``{s}_{e}.parquet`` per chunk ``[s, e)`` and datatype, and the
completion carries one range event per chunk and datatype: ``{"key":
"range:{datatype}:{s}_{e}", "type": "range", "payload": {"start", "end", "partition_key",
"datatype", "dataset", "rows", "output"}}`` (``start``/``end``: the chunk's; ``output``: the
datatype's output index, so the DAG fan-out routes it to that output's consumers). A task of
one chunk (no ``chunk``) is exactly the range's one partition and events.

Failures: a range past the chain head, a malformed range or budget, fails the task for good
(``NonRetryableError``: retrying cannot help the same payload); an unreachable node, a chunk
error, an endpoint still throttling after the budget's backoffs, or a child killed at the
timeout fail it retryably.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import attrs

from trace_sdk._warm_child import WarmChildren
from trace_sdk._worker import NonRetryableError, TaskContext
from trace_sdk.block_hashes import blocks_file_digest

DATATYPES = ("blocks", "transactions", "logs")
#: The child runs as a script (not ``-m trace_sdk...``): it needs neither the SDK nor aiohttp.
_CHILD = str(Path(__file__).with_name("_cryo_child.py"))
#: Extract children, warm: each has imported Cryo before its request arrives.
_EXTRACTS = WarmChildren([sys.executable, _CHILD])
#: The largest range one task extracts.
MAX_RANGE = 100_000
#: The most chunks (partitions per datatype) one task commits.
MAX_PIECES = 1_000


class ExtractError(Exception):
    """A retryable extract failure (node unreachable, chunk errors, child killed or crashed)."""


def block_range(payload: dict[str, Any]) -> tuple[int, int]:
    """``(start, end)`` from the payload (or its upstream range event), checked half-open."""
    source = payload
    if "start" not in payload and isinstance(payload.get("event"), dict):
        source = payload["event"].get("payload") or {}
    try:
        start, end = source["start"], source["end"]
    except (KeyError, TypeError):
        raise NonRetryableError("payload needs a block range: start and end") from None
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (start, end)):
        raise NonRetryableError("start and end must be integers")
    if not 0 <= start < end or end - start > MAX_RANGE:
        raise NonRetryableError(
            f"range [{start}, {end}) must have 0 <= start < end and at most {MAX_RANGE} blocks"
        )
    return start, end


def chunk_size(payload: dict[str, Any], start: int, end: int) -> int:
    """Blocks per chunk of ``[start, end)``: ``payload.chunk``, else the whole range."""
    chunk = payload.get("chunk")
    if chunk is None:
        return end - start
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
        raise NonRetryableError("payload.chunk must be an integer >= 1")
    if -(-(end - start) // chunk) > MAX_PIECES:
        raise NonRetryableError(
            f"range [{start}, {end}) in chunks of {chunk} is more than {MAX_PIECES} chunks"
        )
    return min(chunk, end - start)


def pieces(start: int, end: int, chunk: int) -> list[tuple[int, int]]:
    """The chunks of ``[start, end)`` as Cryo cuts them: ``chunk`` blocks each from ``start``,
    the last one cut at ``end``; each is one partition."""
    return [(s, min(s + chunk, end)) for s in range(start, end, chunk)]


def rpc_endpoint(payload: dict[str, Any], slot_env: dict[str, str]) -> str:
    """The node's endpoint: ``payload.rpc_url``, else the worker-pool slot's ``RPC_URL``; a
    ``{RPC_API_KEY}`` in it is replaced by the slot's ``RPC_API_KEY`` (a ``secret_env``)."""
    rpc = payload.get("rpc_url") or slot_env.get("RPC_URL")
    if not isinstance(rpc, str) or not rpc.startswith(("http://", "https://")):
        raise NonRetryableError(
            "the endpoint (payload.rpc_url or the slot's RPC_URL) must be http(s)"
        )
    if "{RPC_API_KEY}" in rpc:
        key = slot_env.get("RPC_API_KEY")
        if not key:
            raise NonRetryableError("the endpoint names {RPC_API_KEY} but the slot has none")
        rpc = rpc.replace("{RPC_API_KEY}", key)
    return rpc


#: Budget fields, their slot variables and defaults (None: Cryo's own).
BUDGET: dict[str, tuple[str, int | None]] = {
    "requests_per_second": ("RPC_REQUESTS_PER_SECOND", None),
    "max_concurrent_requests": ("RPC_MAX_CONCURRENT_REQUESTS", None),
    "max_retries": ("RPC_MAX_RETRIES", 2),
    "initial_backoff_ms": ("RPC_INITIAL_BACKOFF_MS", 200),
    "throttle_retries": ("RPC_THROTTLE_RETRIES", 6),
}


def rpc_budget(payload: dict[str, Any], slot_env: dict[str, str]) -> dict[str, int | None]:
    """The extract's RPC budget: each field from the slot's ``env`` variable, else the
    payload's field, else its default. Raises ``NonRetryableError`` for a value that is not a
    positive integer (``max_retries`` and ``throttle_retries`` may be 0)."""
    budget: dict[str, int | None] = {}
    for field, (var, default) in BUDGET.items():
        value: object = default
        where = field
        if var in slot_env:
            value, where = slot_env[var], f"the slot's {var}"
        elif field in payload:
            value, where = payload[field], f"payload.{field}"
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        lowest = 0 if field in ("max_retries", "throttle_retries") else 1
        if value is not None and (
            not isinstance(value, int) or isinstance(value, bool) or value < lowest
        ):
            raise NonRetryableError(f"{where} must be an integer >= {lowest}")
        budget[field] = value
    return budget


def partition_key(start: int, end: int) -> str:
    """The partition key (and object stem) of ``[start, end)``."""
    return f"{start}_{end}"


async def cryo_ingest(ctx: TaskContext) -> dict[str, Any] | None:
    """Extracts blocks, transactions and logs of [start, end) with Cryo into Parquet outputs,
    one partition per chunk."""
    payload = ctx.payload
    start, end = block_range(payload)
    chunk = chunk_size(payload, start, end)
    rpc = rpc_endpoint(payload, ctx.env)
    budget = rpc_budget(payload, ctx.env)
    datasets = payload.get("datasets") or {d: d for d in DATATYPES}
    if not isinstance(datasets, dict) or not datasets or not set(datasets) <= set(DATATYPES):
        raise NonRetryableError(f"payload.datasets maps a subset of {DATATYPES} to dataset names")
    # output i of the job: the i-th of blocks, transactions, logs that ``datasets`` names (not
    # the mapping's order: a job's config is stored as jsonb, which does not keep key order)
    datatypes = [d for d in DATATYPES if d in datasets]
    # killed a little before the attempt's own timeout, so the task's error says why
    timeout_s = float(payload.get("extract_timeout_s") or ctx.task.timeout_s * 0.9)
    with tempfile.TemporaryDirectory(prefix="trace-cryo-") as tmp:
        # the endpoint (it may hold a key) travels on the child's stdin: not in its argv or
        # environment, which other local users can read
        request = {
            "start": start,
            "end": end,
            "chunk": chunk,
            "rpc": rpc,
            "out": tmp,
            "datatypes": datatypes,
            "budget": budget,
        }
        started = time.monotonic()
        try:
            line = json.dumps(request).encode() + b"\n"
            code, out = await _EXTRACTS.run(line, timeout_s=timeout_s)
        except TimeoutError:
            raise ExtractError(f"cryo child killed after {timeout_s:g}s") from None
        extract_s = time.monotonic() - started
        answer = _answer(code, out)
        if not answer.get("ok"):
            message = str(answer.get("message", "no message"))
            if answer.get("kind") == "past_head":
                raise NonRetryableError(message)
            raise ExtractError(f"{answer.get('kind')}: {message}")
        checking = time.monotonic()
        found = [
            Piece(int(p["start"]), int(p["end"]), {d: Path(p["files"][d]) for d in datatypes})
            for p in answer["pieces"]
        ]
        if [(p.start, p.end) for p in found] != pieces(start, end, chunk):
            raise ExtractError(f"the child's chunks are not [{start}, {end}) cut every {chunk}")
        counts = await asyncio.to_thread(check_pieces, found)
        staging = time.monotonic()
        # every chunk passed: only now is anything staged
        for piece, rows in zip(found, counts, strict=True):
            await _stage(ctx, piece, rows, datasets, datatypes)
    return {
        "start": start,
        "end": end,
        "pieces": len(found),
        "rows": {d: sum(c[d] for c in counts) for d in datatypes},
        "extract_s": round(extract_s, 3),
        # inside the child: the whole run, Cryo's freeze, and the file checks
        "child_s": answer.get("seconds"),
        "check_s": round(staging - checking, 3),
        "stage_s": round(time.monotonic() - staging, 3),
        "throttled": int(answer.get("throttled", 0)),
        "slot": None if ctx.task.slot is None else ctx.task.slot.index,
    }


@attrs.frozen
class Piece:
    """One chunk ``[start, end)`` of a task's range and its extracted file per datatype."""

    start: int
    end: int
    paths: dict[str, Path]


async def _stage(
    ctx: TaskContext,
    piece: Piece,
    rows: dict[str, int],
    datasets: dict[str, Any],
    datatypes: list[str],
) -> None:
    """Stage one chunk's files as partition ``{start}_{end}`` and add its range events."""
    key = partition_key(piece.start, piece.end)
    partition = {"start": piece.start, "end": piece.end}
    for datatype in datatypes:
        data = await asyncio.to_thread(piece.paths[datatype].read_bytes)
        dataset = str(datasets[datatype])
        await ctx.stage_output(dataset, f"{key}.parquet", data, partition)
        # the blocks' hashes, which the head follower checks against the node (reorgs)
        digest = {}
        if datatype == "blocks":
            path = piece.paths[datatype]
            digest["hashes_sha256"] = await asyncio.to_thread(blocks_file_digest, path)
        ctx.final_events.append(
            {
                "key": f"range:{datatype}:{key}",
                "type": "range",
                "payload": {
                    **partition,
                    "partition_key": key,
                    "datatype": datatype,
                    "dataset": dataset,
                    "rows": rows[datatype],
                    "output": datatypes.index(datatype),
                    **digest,
                },
            }
        )


def check_rows(start: int, end: int, paths: dict[str, Path]) -> dict[str, int]:
    """Rows of each datatype's file of ``[start, end)`` (one chunk): ``check_pieces``."""
    (counts,) = check_pieces([Piece(start, end, paths)])
    return counts


def check_pieces(found: list[Piece]) -> list[dict[str, int]]:
    """Rows of each chunk's file per datatype, checked: every row inside its chunk, and the
    blocks file exactly one row per block (as many rows and distinct block numbers as blocks,
    the first and the last). Raises ``ExtractError``.

    Runs in the worker (a thread), not the extract child: the child then need not import
    pyarrow. Cryo's files carry no min/max statistics, so the ``block_number`` column of each
    non-empty file is read (and only it); the row count is the footer's."""
    import pyarrow.compute as pc  # only workers that ingest pay for it, once
    import pyarrow.parquet as pq

    out: list[dict[str, int]] = []
    for piece in found:
        counts: dict[str, int] = {}
        for datatype, path in piece.paths.items():
            # ParquetFile, not read_table: no dataset discovery (a fifth of the cost)
            file = pq.ParquetFile(path)
            rows, low, high, distinct = file.metadata.num_rows, None, None, 0
            if rows:
                column = file.read(columns=["block_number"], use_threads=False).column(0)
                bounds = pc.min_max(column).as_py()
                low, high = bounds["min"], bounds["max"]
                if datatype == "blocks":
                    distinct = pc.count_distinct(column).as_py()
            outside = rows and (
                low is None or high is None or low < piece.start or high >= piece.end
            )
            # as many distinct blocks as rows, from the first block to the last: each once
            whole = (rows, distinct, low, high) == (
                piece.end - piece.start,
                rows,
                piece.start,
                piece.end - 1,
            )
            if outside or (datatype == "blocks" and not whole):
                raise ExtractError(f"incomplete: {path.name}: {rows} rows, blocks {low}..{high}")
            counts[datatype] = rows
        out.append(counts)
    return out


def _answer(code: int, out: bytes) -> dict[str, Any]:
    """The child's JSON line; a crash before it printed one is a retryable failure."""
    lines = out.decode(errors="replace").strip().splitlines()
    try:
        answer = json.loads(lines[-1]) if lines else None
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        raise ExtractError(f"cryo child exited {code} without an answer")
    return answer


OPERATORS = {"cryo_ingest": cryo_ingest}
