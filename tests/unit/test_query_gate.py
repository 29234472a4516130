"""trace_core.query_gate on DuckDB's own parse trees (``trace_lite.query.parse``)."""

from __future__ import annotations

import pytest

from trace_core import errors
from trace_core.query_gate import NOT_READABLE, admit
from trace_lite.query import parse

GRANTED = ["blocks", "logs"]


@pytest.mark.parametrize(
    ("sql", "used"),
    [
        ("SELECT 1", set()),
        ("SELECT * FROM blocks", {"blocks"}),
        ("SELECT * FROM BLOCKS b JOIN logs l ON b.n = l.n", {"blocks", "logs"}),
        ("SELECT * FROM blocks WHERE n IN (SELECT n FROM logs)", {"blocks", "logs"}),
        ("WITH x AS (SELECT * FROM blocks), y AS (SELECT * FROM x) SELECT * FROM y", {"blocks"}),
        (
            "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 3) "
            "SELECT * FROM r",
            set(),
        ),
        ("SELECT n, count(*) FROM blocks GROUP BY ALL ORDER BY 2 DESC LIMIT 5", {"blocks"}),
        ("SELECT * FROM (VALUES (1, 'a')) v(x, y)", set()),
        ("SELECT list_transform([1, 2], x -> x + 1), current_date", set()),
    ],
)
def test_admitted(sql: str, used: set[str]) -> None:
    assert admit(parse(sql), GRANTED) == used
    assert admit(parse(sql), None) == used


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM other",
        "SELECT * FROM main.blocks",
        "SELECT * FROM x",  # a CTE name used outside its scope is a catalog lookup
        "WITH x AS (SELECT * FROM x) SELECT * FROM x",  # a non-recursive CTE cannot see itself
        "WITH a AS (SELECT * FROM b), b AS (SELECT 1) SELECT * FROM a",  # nor a later one
        "SELECT * FROM duckdb_tables",
        "SELECT * FROM 'blocks.parquet'",
    ],
)
def test_unknown_names_are_not_readable(sql: str) -> None:
    with pytest.raises(errors.NotFound) as info:
        admit(parse(sql), GRANTED)
    assert (info.value.message, info.value.field) == (NOT_READABLE, "sql")


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM range(3)",
        "SELECT current_setting('threads')",
        "SELECT system.main.abs(1)",
        "SELECT pg_catalog.abs(1)",
        "COPY blocks TO 'x'",
        "SELECT 1; SELECT 2",
        "",
        "DESCRIBE blocks",
    ],
)
def test_refused(sql: str) -> None:
    with pytest.raises(errors.ValidationFailed):
        admit(parse(sql), GRANTED)


def test_syntax_error_carries_the_position() -> None:
    with pytest.raises(errors.ValidationFailed) as info:
        admit(parse("SELECT * FROM blocks WHERE"), GRANTED)
    assert info.value.message.startswith("syntax error at position 26: ")
