"""``trace query "SQL" --org ORG [--format table|csv|json] [--max-rows N]`` (mounted by
``trace_servers.cli``): ``POST /v1/query`` with ``TRACE_USER_TOKEN``, printed as an aligned
table (default), CSV or the JSON answer."""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from trace_core import errors
from trace_lite.config import LiteSettings

NULL = "NULL"


def add_parsers(sub: Any) -> None:
    q = sub.add_parser("query", help="run one read-only SQL SELECT over your org's datasets")
    q.add_argument("sql")
    q.add_argument("--org", default="default")
    q.add_argument("--format", choices=["table", "csv", "json"], default="table")
    q.add_argument("--max-rows", type=int, default=None)


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


async def _post(settings: LiteSettings, body: dict[str, Any]) -> Any:
    from trace_sdk import DispatcherClient

    token = os.environ.get("TRACE_USER_TOKEN")
    if not token:
        raise SystemExit("set TRACE_USER_TOKEN (e.g. $(trace users token --sub you))")
    async with DispatcherClient(settings.dispatcher_url, deadline_s=60) as client:
        client.session.headers["Authorization"] = f"Bearer {token}"
        return await client.request("POST", "/v1/query", json_body=body)


def cmd_query(settings: LiteSettings, args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"org": args.org, "sql": args.sql}
    if args.max_rows is not None:
        body["max_rows"] = args.max_rows
    try:
        answer = asyncio.run(_post(settings, body))
    except errors.TraceError as exc:
        where = f" ({exc.field})" if exc.field else ""
        print(f"error: {exc.code}{where}: {exc.message}", file=sys.stderr)
        return 1
    print(render(answer, args.format))
    return 0
