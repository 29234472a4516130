"""The Query Service's parse-level gate: admit exactly one read-only SELECT over granted names.

Theory of operation: DuckDB parses user SQL and serializes its own parse tree
(``json_serialize_sql``); this module judges that tree and never sees SQL text, so there is no
second parser to disagree with DuckDB's. ``json_serialize_sql`` serializes SELECT statements
only: anything else (COPY, ATTACH, SET, PRAGMA, CREATE SECRET, INSTALL, LOAD, EXPORT, PIVOT
statements, DDL, DML) comes back as an error and is refused here. What a SELECT may contain is
an allowlist of node types, walked exhaustively:

* query nodes: ``SELECT_NODE``, ``SET_OPERATION_NODE``, ``RECURSIVE_CTE_NODE``, ``CTE_NODE``;
* table references: a bare name (no catalog or schema, no time travel) that is one of the
  caller's granted dataset names or a CTE in scope, joins, subqueries, ``VALUES`` and no FROM;
  every table function (``read_parquet``, ``glob``, ``duckdb_settings``, ``query``, ...),
  ``DESCRIBE``/``SUMMARIZE`` and ``PIVOT`` references are refused;
* functions (scalar, aggregate, window, operators): unqualified (or ``main.``) names on the
  allowlist of ``trace_core.query_functions`` (what an analyst needs: aggregates, strings,
  dates and times, math, lists/maps/structs, JSON, regular expressions, hashing and encoding);
  any other function is refused, naming it. A function a later DuckDB adds is refused until
  it is listed.

CTE scope follows DuckDB's: a CTE body sees the CTEs defined before it (and itself only when
recursive), so ``WITH duckdb_settings AS (SELECT * FROM duckdb_settings) ...`` cannot reach the
system view through a self-reference.

Every unknown table name is refused with the same message whatever the reason (not granted,
another org's, does not exist): "dataset not found or not readable", naming none.

The gate is one layer: the sandbox process also re-runs it, locks DuckDB's configuration and
runs under OS limits (``docs/architecture/query.md``). Pure: standard library only.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from trace_core import errors
from trace_core.query_functions import ALLOWED_FUNCTIONS

__all__ = [
    "ALLOWED_FUNCTIONS",
    "NOT_READABLE",
    "admit",
]

NOT_READABLE = "dataset not found or not readable"

_NAME = re.compile(r"[a-z][a-z0-9_]{0,127}")
_QUERY_NODES = frozenset({"SELECT_NODE", "SET_OPERATION_NODE", "RECURSIVE_CTE_NODE", "CTE_NODE"})
_REFUSED_REFS = frozenset({"TABLE_FUNCTION", "SHOW_REF", "PIVOT", "COLUMN_DATA", "DELIM_GET"})
_TABLE_REFS = frozenset({"BASE_TABLE", "JOIN", "SUBQUERY", "EXPRESSION_LIST", "EMPTY"})


def _refuse(message: str) -> errors.ValidationFailed:
    return errors.ValidationFailed(message, field="sql")


def admit(parsed: Mapping[str, Any], granted: Iterable[str] | None) -> frozenset[str]:
    """Judge DuckDB's serialized parse tree (the JSON object ``json_serialize_sql`` returns).

    Returns the dataset names the query references. ``granted=None`` admits any well-formed
    bare name (the first pass, before the names are resolved and their permissions checked). Raises ``ValidationFailed`` (field ``sql``:
    a syntax error with its position, not exactly one statement, not a SELECT, a refused
    construct or function) or ``NotFound`` ("dataset not found or not readable", naming none).
    """
    if parsed.get("error"):
        kind = str(parsed.get("error_type", ""))
        message = str(parsed.get("error_message", "invalid query"))
        if kind == "parser":
            position = parsed.get("position")
            where = f" at position {position}" if position not in (None, "") else ""
            raise _refuse(f"syntax error{where}: {message}")
        raise _refuse("only a single read-only SELECT query is allowed")
    statements = parsed.get("statements")
    if not isinstance(statements, list) or len(statements) != 1:
        raise _refuse("send exactly one SELECT statement")
    names = None if granted is None else frozenset(n.lower() for n in granted)
    used: set[str] = set()
    _Walker(names, used).node(statements[0].get("node"), frozenset())
    return frozenset(used)


class _Walker:
    def __init__(self, granted: frozenset[str] | None, used: set[str]) -> None:
        self.granted = granted
        self.used = used

    def node(self, obj: Any, scope: frozenset[str]) -> None:
        """Walk any part of the tree; dispatch on the three kinds of typed objects."""
        if isinstance(obj, list):
            for item in obj:
                self.node(item, scope)
            return
        if not isinstance(obj, dict):
            return
        kind = obj.get("type")
        if (
            isinstance(kind, str) and kind in _REFUSED_REFS
        ):  # whatever shape a future DuckDB gives them
            raise _refuse("table functions, DESCRIBE, SUMMARIZE and PIVOT are not allowed")
        if "class" in obj:
            self.expression(obj, scope)
        elif "modifiers" in obj:
            self.query_node(obj, scope)
        elif "sample" in obj and "type" in obj:
            self.table_ref(obj, scope)
        else:
            for value in obj.values():
                self.node(value, scope)

    def query_node(self, obj: dict[str, Any], scope: frozenset[str]) -> None:
        kind = obj.get("type")
        if kind not in _QUERY_NODES:
            raise _refuse(f"query construct {kind} is not allowed")
        entries = obj.get("cte_map", {}).get("map", [])
        for entry in entries:
            name = str(entry.get("key", "")).lower()
            # A CTE body sees the CTEs before it (a recursive one adds itself below).
            self.node(entry.get("value"), scope)
            scope = scope | {name}
        if kind in ("RECURSIVE_CTE_NODE", "CTE_NODE"):
            scope = scope | {str(obj.get("cte_name", "")).lower()}
        for key, value in obj.items():
            if key != "cte_map":
                self.node(value, scope)

    def table_ref(self, obj: dict[str, Any], scope: frozenset[str]) -> None:
        kind = obj.get("type")
        if kind not in _TABLE_REFS:
            raise _refuse("table functions, DESCRIBE, SUMMARIZE and PIVOT are not allowed")
        if kind == "BASE_TABLE":
            if obj.get("catalog_name") or obj.get("schema_name") or obj.get("at_clause"):
                raise errors.NotFound(NOT_READABLE, field="sql")
            name = str(obj.get("table_name", "")).lower()
            if name in scope:
                return
            if not _NAME.fullmatch(name) or (self.granted is not None and name not in self.granted):
                raise errors.NotFound(NOT_READABLE, field="sql")
            self.used.add(name)
            return
        for key, value in obj.items():
            if key != "type":
                self.node(value, scope)

    def expression(self, obj: dict[str, Any], scope: frozenset[str]) -> None:
        if obj.get("class") in ("FUNCTION", "WINDOW"):
            name = str(obj.get("function_name", "")).lower()
            # DuckDB's parser itself writes ``main.list_value`` for list literals
            if obj.get("schema", "") not in ("", "main") or obj.get("catalog"):
                raise _refuse("qualified function names are not allowed")
            if name not in ALLOWED_FUNCTIONS:
                raise _refuse(f"function {name} is not allowed (not on the Query Service's list)")
        for value in obj.values():
            self.node(value, scope)
