"""Load named SQL blocks from ``.sql`` files.

A file holds blocks introduced by ``-- name: <query_name>`` followed by a one-line
description comment, then the statement with ``%(param)s`` placeholders::

    -- name: claim_tasks
    -- Lease queued tasks that are due, skipping rows other claimers hold.
    SELECT ...;

SQL never lives in f-strings; identifiers go through ``psycopg.sql.Identifier``.
"""

from __future__ import annotations

import re
from functools import cache
from importlib import resources

_NAME = re.compile(r"^--\s*name:\s*([a-z_][a-z0-9_]*)\s*$", re.MULTILINE)


@cache
def load(filename: str) -> dict[str, str]:
    """Return ``{name: sql}`` for the blocks of ``trace_lite/sql/<filename>``."""
    text = resources.files("trace_lite").joinpath("sql", filename).read_text("utf-8")
    parts = _NAME.split(text)
    queries: dict[str, str] = {}
    # parts = [preamble, name1, body1, name2, body2, ...]
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        if name in queries:
            raise ValueError(f"duplicate query name {name!r} in {filename}")
        queries[name] = body.strip()
    return queries
