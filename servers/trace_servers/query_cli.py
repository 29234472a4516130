"""``trace query`` (mounted by ``trace_servers.cli``), with ``TRACE_USER_TOKEN``:

trace query "SQL" [--org ORG] [--format table|csv|json] [--max-rows N]
    POST /v1/query, printed as an aligned table (default), CSV or the JSON answer
trace query export "SQL" [--org ORG] [--format parquet|csv] [--max-rows N] [--wait]
    POST /v1/query/exports: a batch export; prints its status (with --wait, once it ended)
trace query status EXPORT_ID [--wait]     GET /v1/query/exports/{id} (the signed URL)
trace query cancel EXPORT_ID              DELETE /v1/query/exports/{id}
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import json
import sys
from collections.abc import Sequence
from typing import Any

from trace_core import errors
from trace_lite.config import LiteSettings
from trace_servers.user_calls import call_user_api

NULL = "NULL"


def add_parsers(sub: Any) -> None:
    q = sub.add_parser(
        "query",
        help="run one read-only SQL SELECT over your org's datasets (or: export SQL, "
        "status ID, cancel ID for batch exports)",
    )
    q.add_argument("sql", help='the SQL, or "export", "status", "cancel"')
    q.add_argument("arg", nargs="?", help="export: the SQL; status, cancel: the export id")
    q.add_argument("--org", default="default")
    q.add_argument(
        "--format",
        choices=["table", "csv", "json", "parquet"],
        default=None,
        help="query: table (default), csv, json; export: parquet (default), csv",
    )
    q.add_argument("--max-rows", type=int, default=None)
    q.add_argument("--wait", action="store_true", help="export, status: wait until it ended")


def _cell(value: Any) -> str:
    if value is None:
        return NULL
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | dict):
        return json.dumps(value)
    return str(value)


def format_table(
    columns: Sequence[str], types: Sequence[str], rows: Sequence[Sequence[Any]]
) -> str:
    """An aligned text table: a header, a rule, one line per row; numbers right-aligned."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    numeric = [
        t.split("(")[0]
        in {
            "TINYINT",
            "SMALLINT",
            "INTEGER",
            "BIGINT",
            "HUGEINT",
            "UBIGINT",
            "UINTEGER",
            "USMALLINT",
            "UTINYINT",
            "UHUGEINT",
            "FLOAT",
            "DOUBLE",
            "DECIMAL",
        }
        for t in types
    ]

    def line(values: Sequence[str]) -> str:
        parts = [
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(values, widths, numeric, strict=True)
        ]
        return " | ".join(parts).rstrip()

    out = [line(list(columns)), "-+-".join("-" * w for w in widths)]
    out.extend(line(r) for r in cells)
    return "\n".join(out)


def render(answer: dict[str, Any], fmt: str) -> str:
    """The text ``trace query`` prints for a ``/v1/query`` JSON answer."""
    columns = [c["name"] for c in answer["columns"]]
    types = [c["type"] for c in answer["columns"]]
    rows = answer["rows"]
    if fmt == "json":
        return json.dumps(answer, indent=2)
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows([["" if v is None else _cell(v) for v in r] for r in rows])
        return buf.getvalue().rstrip("\n")
    text = format_table(columns, types, rows)
    n = len(rows)
    tail = f"({n} row{'s' if n != 1 else ''}{', truncated' if answer['truncated'] else ''})"
    return f"{text}\n{tail}"


async def _call(
    settings: LiteSettings, method: str, path: str, body: dict[str, Any] | None = None
) -> Any:
    return await call_user_api(settings, method, path, body, deadline_s=60)


async def _export_call(settings: LiteSettings, args: argparse.Namespace) -> Any:
    """The export action's answer; with ``--wait``, polled until the export has ended."""
    if args.sql == "export":
        body: dict[str, Any] = {"org": args.org, "sql": args.arg, "format": args.format}
        if args.max_rows is not None:
            body["max_rows"] = args.max_rows
        status = await _call(settings, "POST", "/v1/query/exports", body)
    elif args.sql == "status":
        status = await _call(settings, "GET", f"/v1/query/exports/{args.arg}")
    else:
        return await _call(settings, "DELETE", f"/v1/query/exports/{args.arg}")
    while args.wait and status["state"] == "running":
        await asyncio.sleep(0.5)
        status = await _call(settings, "GET", f"/v1/query/exports/{status['export_id']}")
    return status


EXPORT_ACTIONS = ("export", "status", "cancel")


def cmd_query(settings: LiteSettings, args: argparse.Namespace) -> int:
    if args.sql in EXPORT_ACTIONS:
        return _cmd_export(settings, args)
    if args.arg is not None:
        print("error: one SQL string (quote it)", file=sys.stderr)
        return 2
    fmt = args.format or "table"
    if fmt == "parquet":
        print("error: --format parquet is for `trace query export`", file=sys.stderr)
        return 2
    body: dict[str, Any] = {"org": args.org, "sql": args.sql}
    if args.max_rows is not None:
        body["max_rows"] = args.max_rows
    try:
        answer = asyncio.run(_call(settings, "POST", "/v1/query", body))
    except errors.TraceError as exc:
        return _error(exc)
    print(render(answer, fmt))
    return 0


def _cmd_export(settings: LiteSettings, args: argparse.Namespace) -> int:
    if args.arg is None:
        what = "the SQL" if args.sql == "export" else "the export id"
        print(f"error: trace query {args.sql} needs {what}", file=sys.stderr)
        return 2
    args.format = args.format or "parquet"
    if args.sql == "export" and args.format not in ("parquet", "csv"):
        print("error: an export is --format parquet or csv", file=sys.stderr)
        return 2
    try:
        status = asyncio.run(_export_call(settings, args))
    except errors.TraceError as exc:
        return _error(exc)
    print(json.dumps(status, indent=2))
    return 1 if status["state"] == "failed" else 0


def _error(exc: errors.TraceError) -> int:
    where = f" ({exc.field})" if exc.field else ""
    print(f"error: {exc.code}{where}: {exc.message}", file=sys.stderr)
    return 1
