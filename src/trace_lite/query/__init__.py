"""SQL over published datasets in a sandboxed DuckDB (``docs/architecture/query.md``)."""

from trace_lite.query.runner import Limits, SandboxResult, run_sandboxed
from trace_lite.query.service import QueryResult, QueryService, parse

__all__ = ["Limits", "QueryResult", "QueryService", "SandboxResult", "parse", "run_sandboxed"]
