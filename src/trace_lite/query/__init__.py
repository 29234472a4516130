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
from trace_lite.query.service import QueryOutcome, QueryResult, QueryService, parse

__all__ = [
    "CsvTable",
    "Limits",
    "QueryLimitExceeded",
    "QueryOutcome",
    "QueryResult",
    "QueryService",
    "SandboxPool",
    "SandboxResult",
    "TableSource",
    "parse",
    "run_sandboxed",
]
