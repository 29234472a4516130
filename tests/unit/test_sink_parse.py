"""trace_core.sink: strict batch parsing against a dataset schema, and row dedupe keys."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trace_core import errors
from trace_core import sink as sink_mod
from trace_core.sink import (
    MAX_BATCH_BYTES,
    MAX_BATCH_ROWS,
    MAX_PROBLEMS,
    DatasetSchema,
    MalformedBatch,
    Scope,
    dedupe_key,
    dedupe_keys,
    parse_batch,
)

SCHEMA = DatasetSchema.of(
    {
        "tx_hash": "bytes",
        "log_index": "int32",
        "value": "uint256",
        "note": "string",
        "ok": "bool",
        "price": "decimal",
        "at": "timestamp",
        "day": "date",
        "meta": "json",
        "ratio": "float64",
    },
    ["tx_hash", "log_index"],
)
TASK = "0b0c7a8e-9d7e-4a43-9f40-2b1f4c3f7e11"
DS = "7f1e2d3c-4b5a-4968-8776-655443322110"


def lines(*rows: Any) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


def problems(data: bytes, schema: DatasetSchema = SCHEMA) -> list[tuple[int | None, str | None]]:
    with pytest.raises(MalformedBatch) as info:
        parse_batch(data, schema)
    return [(p.row, p.field) for p in info.value.problems]


def test_a_good_batch_parses_to_typed_values_in_column_order() -> None:
    batch = parse_batch(
        lines(
            {
                "tx_hash": "0xab01",
                "log_index": 3,
                "value": str(2**255),
                "note": "hi",
                "ok": True,
                "price": "1.50",
                "at": "2024-01-02T03:04:05Z",
                "day": "2024-01-02",
                "meta": {"a": [1, None]},
                "ratio": 1,
            },
            {"tx_hash": "0x", "log_index": -1},
        ),
        SCHEMA,
    )
    assert batch.columns[:3] == ("tx_hash", "log_index", "value")
    first, second = batch.rows
    assert first == (
        b"\xab\x01",
        3,
        2**255,
        "hi",
        True,
        Decimal("1.50"),
        datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC),
        date(2024, 1, 2),
        {"a": [1, None]},
        1.0,
    )
    assert second == (b"", -1, None, None, None, None, None, None, None, None)


@pytest.mark.parametrize(
    ("row", "field", "words"),
    [
        ({"tx_hash": "0x01", "log_index": 2**31}, "log_index", "out of range for int32"),
        ({"tx_hash": "0x01", "log_index": True}, "log_index", "expected int32"),
        ({"tx_hash": "0x01", "log_index": 1.5}, "log_index", "expected int32"),
        ({"tx_hash": "0x01", "log_index": 1, "value": -1}, "value", "out of range"),
        ({"tx_hash": "0x01", "log_index": 1, "value": str(2**256)}, "value", "out of range"),
        ({"tx_hash": "0xabc", "log_index": 1}, "tx_hash", "0x-prefixed hex"),
        ({"tx_hash": "0x01", "log_index": 1, "note": 5}, "note", "expected string"),
        ({"tx_hash": "0x01", "log_index": 1, "note": "a\x00"}, "note", "NUL"),
        ({"tx_hash": "0x01", "log_index": 1, "note": "x" * 70_000}, "note", "over the limit"),
        ({"tx_hash": "0x01", "log_index": 1, "ok": "yes"}, "ok", "expected bool"),
        ({"tx_hash": "0x01", "log_index": 1, "price": "1e5"}, "price", "expected decimal"),
        ({"tx_hash": "0x01", "log_index": 1, "at": "2024-01-02T03:04:05"}, "at", "time zone"),
        ({"tx_hash": "0x01", "log_index": 1, "day": "2024-02-30"}, "day", "not a valid date"),
        ({"tx_hash": "0x01", "log_index": 1, "ratio": "1"}, "ratio", "expected float64"),
        ({"tx_hash": "0x01", "log_index": 1, "extra": 1}, "extra", "not a column"),
        ({"log_index": 1}, "tx_hash", "required"),
        ({"tx_hash": None, "log_index": 1}, "tx_hash", "required"),
    ],
)
def test_each_bad_value_is_named_by_row_field_and_what(
    row: dict[str, Any], field: str, words: str
) -> None:
    good = {"tx_hash": "0x00", "log_index": 0}
    with pytest.raises(MalformedBatch) as info:
        parse_batch(lines(good, good, row), SCHEMA)
    err = info.value
    assert isinstance(err, errors.ValidationFailed)
    (p,) = err.problems
    assert (p.row, p.field) == (2, field)
    assert words in p.message
    assert err.field == f"rows[2].{field}"
    assert f"row 2 field {field}" in err.message


def test_lines_that_are_not_json_objects_are_named() -> None:
    data = b'{"tx_hash": "0x00", "log_index": 0}\n[1]\nnot json\n{"a": 1, "a": 2}\n{"x": NaN}\n'
    assert problems(data) == [(1, None), (2, None), (3, None), (4, None)]
    assert problems(b"\xff\n")[0] == (None, None)


def test_every_problem_is_listed_up_to_the_cap() -> None:
    rows = [{"tx_hash": "0x00", "log_index": "x"} for _ in range(MAX_PROBLEMS + 5)]
    with pytest.raises(MalformedBatch) as info:
        parse_batch(lines(*rows), SCHEMA)
    assert len(info.value.problems) == MAX_PROBLEMS
    assert info.value.details["more"] == 5
    assert "and 5 more" in info.value.message


def test_size_and_row_limits() -> None:
    row = {"tx_hash": "0x00", "log_index": 0}
    assert parse_batch(lines(*[row] * MAX_BATCH_ROWS), SCHEMA).rows
    assert problems(lines(*[row] * (MAX_BATCH_ROWS + 1))) == [(None, None)]
    big = lines({"tx_hash": "0x00", "log_index": 0, "note": "x" * 60_000})
    assert problems(big * (MAX_BATCH_BYTES // len(big) + 1)) == [(None, None)]
    assert parse_batch(b"", SCHEMA).rows == ()


def test_the_registry_schema_is_checked() -> None:
    with pytest.raises(errors.ValidationFailed):
        DatasetSchema.of({"a": "int128"})
    with pytest.raises(errors.ValidationFailed):
        DatasetSchema.of({"a": "int32"}, ["b"])


def test_dedupe_key_depends_on_every_part() -> None:
    base = dedupe_key(TASK, DS, Scope(range=(0, 10)), [b"\x01", 1])
    assert base == dedupe_key(TASK.upper(), DS, Scope(range=(0, 10)), [b"\x01", 1])
    others = {
        dedupe_key("1" + TASK[1:], DS, Scope(range=(0, 10)), [b"\x01", 1]),
        dedupe_key(TASK, "1" + DS[1:], Scope(range=(0, 10)), [b"\x01", 1]),
        dedupe_key(TASK, DS, Scope(range=(0, 11)), [b"\x01", 1]),
        dedupe_key(TASK, DS, Scope(partition_key="0"), [b"\x01", 1]),
        dedupe_key(TASK, DS, Scope(cursor="0"), [b"\x01", 1]),
        dedupe_key(TASK, DS, None, [b"\x01", 1]),
        dedupe_key(TASK, DS, Scope(range=(0, 10)), [b"\x01", 2]),
        dedupe_key(TASK, DS, Scope(range=(0, 10)), ["01", 1]),
        dedupe_key(TASK, DS, Scope(range=(0, 10)), [b"\x01", "1"]),
    }
    assert base not in others and len(others) == 9


json_scalars = st.none() | st.booleans() | st.integers() | st.text(max_size=5)
key_values = st.lists(
    json_scalars | st.binary(max_size=4) | st.decimals(allow_nan=False, allow_infinity=False),
    max_size=3,
)


@given(a=key_values, b=key_values)
def test_dedupe_keys_are_equal_exactly_when_the_values_are(a: list[Any], b: list[Any]) -> None:
    def norm(vs: list[Any]) -> list[Any]:
        return [(type(v), v.normalize() if isinstance(v, Decimal) else v) for v in vs]

    same = norm(a) == norm(b)
    assert (dedupe_key(TASK, DS, None, a) == dedupe_key(TASK, DS, None, b)) == same


rows_st = st.lists(
    st.fixed_dictionaries(
        {"tx_hash": st.binary(max_size=8).map(lambda b: "0x" + b.hex())},
        optional={
            "log_index": st.integers(-(2**31), 2**31 - 1),
            "value": st.integers(0, 2**256 - 1),
            "note": st.text(max_size=10).filter(lambda s: "\x00" not in s),
        },
    ).map(lambda r: {"log_index": 0, **r}),
    max_size=30,
)


@given(rows=rows_st)
def test_good_rows_round_trip_and_keys_follow_the_unique_key(rows: list[dict[str, Any]]) -> None:
    batch = parse_batch(lines(*rows), SCHEMA)
    assert len(batch.rows) == len(rows)
    for parsed, raw in zip(batch.rows, rows, strict=True):
        assert parsed[0] == bytes.fromhex(raw["tx_hash"][2:])
        assert parsed[1] == raw["log_index"]
        assert parsed[2] == raw.get("value")
    keys = dedupe_keys(batch, SCHEMA, producer_task_id=TASK, dataset_uuid=DS, scope=None)
    ids = [(r["tx_hash"], r["log_index"]) for r in rows]
    assert len(set(keys)) == len(set(ids))


@given(rows=rows_st, bad_at=st.integers(0, 29), column=st.sampled_from(["log_index", "value", "x"]))
def test_one_bad_value_rejects_the_whole_batch_naming_it(
    rows: list[dict[str, Any]], bad_at: int, column: str
) -> None:
    if not rows:
        return
    i = bad_at % len(rows)
    rows[i] = {**rows[i], column: "bad"}
    assert problems(lines(*rows)) == [(i, column)]


any_value = (
    st.none()
    | st.booleans()
    | st.integers(-(2**300), 2**300)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
    | st.sampled_from(["0x", "0xab", "0xAB", "0x ab", "0xa", "12", "-12", "²", " 12", "0x0g"])
    | st.binary(max_size=6).map(lambda b: "0x" + b.hex())
    | st.integers(0, 2**256).map(str)
)


@given(typ=st.sampled_from(sorted(sink_mod.COLUMN_TYPES)), raw=any_value)
def test_fast_converters_agree_with_the_reference(typ: str, raw: Any) -> None:
    """Each column type's fast converter accepts exactly what ``_convert`` accepts, with the
    same value."""

    def run(f: Any) -> Any:
        try:
            return ("ok", f(raw))
        except sink_mod._BadValue:
            return ("bad", None)

    assert run(sink_mod._CONVERTERS[typ]) == run(lambda r: sink_mod._convert(typ, r))


def test_fast_paths_refuse_what_the_reference_refuses() -> None:
    for typ, raw in [("bytes", "0x ab"), ("bytes", "0xa"), ("int64", "²"), ("int64", " 12")]:
        with pytest.raises(sink_mod._BadValue):
            sink_mod._CONVERTERS[typ](raw)
    assert sink_mod._CONVERTERS["bytes"]("0xAB") == b"\xab"
    assert sink_mod._CONVERTERS["int32"]("-12") == -12
