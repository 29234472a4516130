"""SQL over published datasets in a sandboxed DuckDB (``docs/architecture/query.md``)."""

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
