"""trace_core.sink.schema_evolution: a buffered dataset's table takes new nullable columns and
widened types; every other change is a problem with its path. Every pair of column types is
checked against the widening table, and every widening keeps every value the old type parses."""

from __future__ import annotations

import itertools

import pytest

from trace_core.dag import COLUMN_TYPES
from trace_core.sink import (
    WIDENINGS,
    DatasetSchema,
    SchemaEvolution,
    parse_batch,
    schema_evolution,
)

PATH = "jobs.detect.outputs[0]"


def evolve(
    old: dict[str, str],
    new: dict[str, str],
    uk_old: tuple[str, ...] = ("k",),
    uk_new: tuple[str, ...] = ("k",),
) -> SchemaEvolution:
    return schema_evolution(
        DatasetSchema.of({"k": "string", **old}, uk_old),
        DatasetSchema.of({"k": "string", **new}, uk_new),
        dataset="transfers",
        path=PATH,
    )


@pytest.mark.parametrize(("was", "now"), list(itertools.product(sorted(COLUMN_TYPES), repeat=2)))
def test_a_type_change_is_accepted_exactly_when_it_widens(was: str, now: str) -> None:
    change = evolve({"v": was}, {"v": now})
    if was == now:
        assert change == evolve({"v": was}, {"v": was}) and not change.problems
        assert change.widened == ()
    elif now in WIDENINGS.get(was, ()):
        assert change.widened == (("v", was, now),) and change.problems == ()
    else:
        (problem,) = change.problems
        assert problem.field == f"{PATH}.schema.v"
        assert f"cannot change from {was} to {now}" in problem.message


@pytest.mark.parametrize(("was", "now"), [(a, b) for a, wider in WIDENINGS.items() for b in wider])
def test_every_widening_parses_every_boundary_value_of_the_old_type(was: str, now: str) -> None:
    samples = {
        "int32": ["-2147483648", "2147483647"],
        "uint32": ["0", "4294967295"],
        "int64": ["-9223372036854775808", "9223372036854775807"],
        "uint64": ["0", "18446744073709551615"],
        "uint256": ["0", str(2**256 - 1)],
    }[was]
    for value in samples:
        line = f'{{"k": "a", "v": "{value}"}}\n'.encode()
        old = parse_batch(line, DatasetSchema.of({"k": "string", "v": was}, ["k"]))
        new = parse_batch(line, DatasetSchema.of({"k": "string", "v": now}, ["k"]))
        assert int(new.rows[0][1]) == int(old.rows[0][1]) == int(value)


def test_new_columns_are_added_and_removals_and_unique_key_changes_refused() -> None:
    change = evolve({"a": "int32"}, {"a": "int32", "b": "string", "c": "json"})
    assert change.added == (("b", "string"), ("c", "json")) and change.problems == ()
    change = evolve({"a": "int32", "b": "string"}, {"a": "int32", "n": "int64"}, ("k",), ("k", "n"))
    assert [(p.field, p.row) for p in change.problems] == [
        (f"{PATH}.schema", None),
        (f"{PATH}.unique_key", None),
    ]
    assert "column 'b' of buffered dataset 'transfers' is removed" in change.problems[0].message
    assert "['k'] to ['k', 'n']" in change.problems[1].message
