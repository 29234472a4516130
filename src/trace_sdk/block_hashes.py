"""One digest of a block range's hashes, so what was extracted can be checked against a node.

``cryo_ingest`` records ``hashes_digest`` of the blocks file it commits in that range's blocks
event (``hashes_sha256``); the head follower computes the same digest from the node's answers
and extracts a range again when the two differ (``trace_sdk.follower``, "Reorgs"). The digest is
the hex SHA-256 of the range's 32-byte block hashes concatenated in block order: equal digests,
equal blocks (every block of the range, not only the last).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path


def hashes_digest(hashes: Iterable[bytes]) -> str:
    """The hex SHA-256 of ``hashes`` (32 bytes each, in block order) concatenated."""
    h = hashlib.sha256()
    for block_hash in hashes:
        h.update(block_hash)
    return h.hexdigest()


def hex_hashes_digest(hashes: Iterable[str]) -> str:
    """``hashes_digest`` of ``0x``-hex block hashes (a node's JSON-RPC answers)."""
    return hashes_digest(bytes.fromhex(h.removeprefix("0x")) for h in hashes)


def blocks_file_digest(path: Path) -> str:
    """``hashes_digest`` of a Cryo blocks Parquet file's ``block_hash`` column, in block
    order (pyarrow: the worker that ingests has it)."""
    import pyarrow.parquet as pq  # only workers that ingest pay for it

    table = pq.ParquetFile(path).read(columns=["block_number", "block_hash"], use_threads=False)
    numbers, hashes = table.column(0).to_pylist(), table.column(1).to_pylist()
    return hashes_digest(h for _, h in sorted(zip(numbers, hashes, strict=True)))


__all__ = ["blocks_file_digest", "hashes_digest", "hex_hashes_digest"]
