"""trace_core.query_gate on DuckDB's own parse trees (``trace_lite.query.parse``)."""

from __future__ import annotations

import pytest

from trace_core import errors
from trace_core.query_functions import ALLOWED_FUNCTIONS, FUNCTION_GROUPS
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


#: What an analyst writes: windows, LIKE/ILIKE/SIMILAR TO/GLOB, dates and intervals, lists,
#: structs and maps, lambdas and comprehensions, string/regex/hash functions, JSON, aggregates
#: with FILTER / ORDER BY / WITHIN GROUP, ROLLUP, QUALIFY, subquery predicates, operators.
ANALYST_SQL = [
    "SELECT n, tag, row_number() OVER (PARTITION BY tag ORDER BY n), rank() OVER w, dense_rank() OVER w, lag(n) OVER w, lead(n, 2) OVER w, first_value(n) OVER w, last_value(n) OVER w, nth_value(n, 2) OVER w, ntile(4) OVER w, percent_rank() OVER w, cume_dist() OVER w, sum(n) OVER w FROM blocks WINDOW w AS (ORDER BY n)",
    "SELECT * FROM blocks WHERE tag LIKE 'a%' OR tag ILIKE 'B%' OR tag NOT LIKE 'c' OR tag NOT ILIKE 'd' OR tag SIMILAR TO 'x.*' OR tag ~ 'y' OR tag GLOB 'z*' OR tag LIKE 'a!%' ESCAPE '!'",
    "SELECT extract(year FROM ts), date_part('month', ts), date_trunc('day', ts), ts + INTERVAL 1 DAY, ts - INTERVAL '2 hours', age(ts), strftime(ts, '%Y'), epoch_ms(ts), to_timestamp(1), make_date(2020,1,1), current_date, now(), today() FROM blocks",
    "SELECT [1,2,3][1], [1,2,3][1:2], {'a': 1}.a, {'a': 1}['a'], MAP {'k': 1}, list_transform([1], x -> x * 2), [x * 2 FOR x IN [1, 2] IF x > 1], unnest([1,2]), len([1]), array_length([1]) FROM blocks",
    "SELECT 'a' || 'b', concat('a', 1), CASE WHEN n > 1 THEN 'x' ELSE 'y' END, coalesce(n, 0), nullif(n, 0), ifnull(n, 0), n IN (1,2), n BETWEEN 1 AND 2, CAST(n AS VARCHAR), TRY_CAST(tag AS INT), n::DOUBLE, n IS DISTINCT FROM 1, n IS NULL, NOT (n = 1), -n, n % 2, n // 2, 2 ** 3, abs(-1), round(1.5, 1) FROM blocks",
    "SELECT tag, count(*), count(DISTINCT n), sum(n) FILTER (WHERE n > 1), string_agg(tag, ',' ORDER BY n), percentile_cont(0.5) WITHIN GROUP (ORDER BY n), median(n), approx_count_distinct(n), arg_max(tag, n), list(n), grouping(tag) FROM blocks GROUP BY ROLLUP (tag) HAVING count(*) > 0 QUALIFY row_number() OVER (ORDER BY tag) = 1",
    "SELECT md5(tag), sha256(tag), hash(n), hex(n), to_base64(tag::BLOB), regexp_extract(tag, 'a(b)', 1), regexp_replace(tag, 'a', 'b'), regexp_matches(tag, 'x'), lower(tag), upper(tag), trim(tag), substr(tag, 1, 2), split_part(tag, ',', 1), length(tag), left(tag, 1), replace(tag, 'a', 'b'), starts_with(tag, 'a'), lpad(tag, 3, '0'), format('{}', n), printf('%d', n), levenshtein(tag, 'x') FROM blocks",
    "SELECT json_extract(j, '$.a'), j->>'a', j->'a', json_extract_string(j, '$.b'), to_json(n), gen_random_uuid(), typeof(n), greatest(1, 2), least(1, 2), random(), uuid() FROM (SELECT '{\"a\":1}'::JSON AS j, 1 AS n)",
    "SELECT * FROM blocks WHERE EXISTS (SELECT 1 FROM logs WHERE logs.n = blocks.n) AND n > ALL (SELECT n FROM logs) AND n = ANY (SELECT n FROM logs)",
    "SELECT * EXCLUDE (tag), COLUMNS('n') FROM blocks ORDER BY ALL",
    "SELECT time_bucket(INTERVAL '1 hour', ts), date_diff('day', ts, ts), dayname(ts), year(ts), month(ts), hour(ts), epoch(ts), ts AT TIME ZONE 'UTC' FROM blocks",
    "SELECT struct_pack(a := 1), row(1, 2), list_value(1), array_value(1), map_keys(MAP {'a': 1}), list_sum([1]), list_sort([2,1]), list_distinct([1,1]), flatten([[1]]), generate_series(1, 3), range(3) FROM blocks",
    "SELECT n::HUGEINT * 2, (n + 1) / 2.0, n << 1, n >> 1, n & 1, n | 1, xor(n, 1), ~n, bit_count(n), sign(n), sqrt(4), ln(2), log10(100), pow(2, 3), floor(1.2), ceil(1.2), trunc(1.2) FROM blocks",
    "SELECT n!, position('a' IN tag), trim(BOTH 'x' FROM tag), substring(tag FROM 1 FOR 2), tag ^@ 'a', [1] @> [1], [1] && [1], tag COLLATE NOCASE FROM blocks",
]


@pytest.mark.parametrize("sql", ANALYST_SQL)
def test_what_an_analyst_needs_is_admitted(sql: str) -> None:
    assert admit(parse(sql), GRANTED) <= {"blocks", "logs"}


@pytest.mark.parametrize(
    "name",
    [
        "current_setting('threads')",
        "version()",
        "stats(1)",
        "write_log('x')",
        "pg_typeof(1)",
        "icu_sort_key('a', 'b')",
        "getvariable('x')",
        "current_database()",
        "enum_range(NULL::VARCHAR)",
        "parse_filename('/etc/passwd')",
        # not a DuckDB 1.4.4 function at all: a function a later version adds is refused too
        "some_future_function(1)",
    ],
)
def test_functions_off_the_allowlist_are_refused_by_name(name: str) -> None:
    function = name.split("(")[0]
    for sql in (f"SELECT {name}", f"SELECT n FROM blocks WHERE {name} IS NOT NULL"):
        with pytest.raises(errors.ValidationFailed) as info:
            admit(parse(sql), GRANTED)
        assert info.value.field == "sql"
        assert info.value.message == (
            f"function {function} is not allowed (not on the Query Service's list)"
        )


def test_window_functions_are_checked_against_the_allowlist_too() -> None:
    with pytest.raises(errors.ValidationFailed, match="function current_setting is not"):
        admit(parse("SELECT current_setting('x') OVER () FROM blocks"), GRANTED)


def test_every_allowed_function_exists_in_the_pinned_duckdb() -> None:
    """No typo and no stale name: the list is checked against DuckDB's own catalog (window
    functions and operators are not in ``duckdb_functions()``)."""
    import duckdb

    known = {r[0] for r in duckdb.sql("SELECT function_name FROM duckdb_functions()").fetchall()}
    listed = ALLOWED_FUNCTIONS - FUNCTION_GROUPS["window functions"]
    assert listed - known == set()
