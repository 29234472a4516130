"""SQL over published datasets in a sandboxed DuckDB (``docs/architecture/query.md``).

The public names are imported on first use (PEP 562): the sandbox process runs
``python -m trace_lite.query.sandbox``, which imports this package first, and must not pay for
the server's imports (aiohttp, psycopg, the datasets registry) before its query can start.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trace_lite.query.runner import (
        CsvTable,
        Limits,
        QueryLimitExceeded,
        SandboxPool,
        SandboxResult,
        TableSource,
        run_sandboxed,
    )
    from trace_lite.query.service import (
        STREAM_LIMITS,
        QueryOutcome,
        QueryResult,
        QueryService,
        QueryStream,
        parse,
    )
    from trace_lite.query.values import ARROW_EOS, jsonable

_WHERE = {
    "CsvTable": "runner",
    "Limits": "runner",
    "QueryLimitExceeded": "runner",
    "SandboxPool": "runner",
    "SandboxResult": "runner",
    "TableSource": "runner",
    "run_sandboxed": "runner",
    "STREAM_LIMITS": "service",
    "QueryOutcome": "service",
    "QueryResult": "service",
    "QueryService": "service",
    "QueryStream": "service",
    "parse": "service",
    "ARROW_EOS": "values",
    "jsonable": "values",
}

__all__ = [
    "ARROW_EOS",
    "STREAM_LIMITS",
    "CsvTable",
    "Limits",
    "QueryLimitExceeded",
    "QueryOutcome",
    "QueryResult",
    "QueryService",
    "QueryStream",
    "SandboxPool",
    "SandboxResult",
    "TableSource",
    "jsonable",
    "parse",
    "run_sandboxed",
]


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{where}"), name)
    globals()[name] = value
    return value
