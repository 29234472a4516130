"""``trace query`` output: the aligned table, CSV and JSON renderings of a /v1/query answer."""

from __future__ import annotations

from trace_servers.cli import build_parser
from trace_servers.query_cli import render

ANSWER = {
    "columns": [
        {"name": "tag", "type": "VARCHAR"},
        {"name": "n", "type": "BIGINT"},
        {"name": "extra", "type": "INTEGER[]"},
    ],
    "rows": [["v1", 5, [1, 2]], ["longer tag", 12345, None]],
    "truncated": True,
    "versions": {"shared": "0b7c"},
}


def test_table_is_aligned_numbers_right() -> None:
    assert render(ANSWER, "table").splitlines() == [
        "tag        |     n | extra",
        "-----------+-------+-------",
        "v1         |     5 | [1, 2]",
        "longer tag | 12345 | NULL",
        "(2 rows, truncated)",
    ]


def test_csv_and_json() -> None:
    assert render(ANSWER, "csv") == 'tag,n,extra\nv1,5,"[1, 2]"\nlonger tag,12345,'
    assert '"truncated": true' in render(ANSWER, "json")


def test_the_command_is_registered() -> None:
    args = build_parser().parse_args(["query", "SELECT 1", "--org", "acme", "--format", "csv"])
    assert (args.cmd, args.sql, args.org, args.format) == ("query", "SELECT 1", "acme", "csv")
