"""trace_core.json_limits: what jsonb cannot store is refused with a field path, the rest passes."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trace_core import errors, json_limits
from trace_core.json_limits import JsonLimits


def refused(body: bytes | str) -> errors.ValidationFailed:
    with pytest.raises(errors.ValidationFailed) as info:
        json_limits.loads(body)
    return info.value


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ('{"result": {"a": [0, 1, 2, {"b": "x\\u0000y"}]}}', "result.a[3].b"),
        ('{"a\\u0000": 1}', '["a\\u0000"]'),
        ('{"p": "\\ud800"}', "p"),
        ('{"p": "ok \\udfff"}', "p"),
        ('{"p": {"\\udc00": 1}}', 'p["\\udc00"]'),
        ('{"n": NaN}', "n"),
        ('{"n": Infinity}', "n"),
        ('{"n": [-Infinity]}', "n[0]"),
        ('{"n": 1e400}', "n"),
        ('{"n": -1e400}', "n"),
        ('{"n": ' + "9" * 5000 + "}", "n"),
        ('{"n": -' + "9" * 5000 + "}", "n"),
        ('{"n": ' + str(2**256 + 1) + "}", "n"),
    ],
)
def test_unstorable_values_are_refused_with_their_path(body: str, field: str) -> None:
    exc = refused(body)
    assert exc.field == field
    assert "Error" not in exc.message  # no Python exception names


@pytest.mark.parametrize("depth", [65, 500, 1_000, 100_000])
def test_deep_nesting_is_refused_without_recursion_error(depth: int) -> None:
    for open_, close in (("[", "]"), ('{"a":', "}")):
        exc = refused(open_ * depth + "1" + close * depth)
        assert "64 levels" in exc.message


def test_nesting_at_the_limit_passes() -> None:
    assert json_limits.loads("[" * 64 + "]" * 64) is not None
    assert json_limits.loads('{"a":' * 63 + "[]" + "}" * 63) is not None


def test_uint256_values_pass() -> None:
    top = 2**256 - 1
    assert json_limits.loads(f'{{"v": {top}, "w": -{top}}}') == {"v": top, "w": -top}
    assert json_limits.loads(str(2**256)) == 2**256


def test_valid_unicode_passes() -> None:
    value = json_limits.loads('{"emoji": "\\ud83d\\ude00", "k\\u00e9y": "\u00e9"}')
    assert value == {"emoji": "\U0001f600", "k\u00e9y": "\u00e9"}


@pytest.mark.parametrize("body", [b"", b"nope", b'{"a": 1', b"\xff\xfe", b'{"a": 1} x'])
def test_non_json_is_malformed(body: bytes) -> None:
    with pytest.raises(errors.MalformedBody) as info:
        json_limits.loads(body)
    assert info.value.field == "$"
    assert "Error" not in info.value.message


def test_long_strings_are_refused() -> None:
    small = JsonLimits(max_string_chars=10)
    with pytest.raises(errors.ValidationFailed) as info:
        json_limits.loads('{"a": ["' + "x" * 11 + '"]}', limits=small)
    assert info.value.field == "a[0]"
    json_limits.loads('{"a": ["' + "x" * 10 + '"]}', limits=small)


def test_check_refuses_in_process_values_with_prefix() -> None:
    cases: list[tuple[Any, str]] = [
        ({"a": float("nan")}, "result.a"),
        ({"a": [1, math.inf]}, "result.a[1]"),
        ({"a": {"b\x00": 1}}, 'result.a["b\\u0000"]'),
        ({"a": "\ud800"}, "result.a"),
        ({"a": 2**300}, "result.a"),
        ({"a": {1: 2}}, "result.a"),
        ({"a": {1, 2}}, "result.a"),
        ({"a": b"bytes"}, "result.a"),
    ]
    for value, field in cases:
        with pytest.raises(errors.ValidationFailed) as info:
            json_limits.check(value, path="result")
        assert info.value.field == field, value


def test_check_depth_counts_from_the_value() -> None:
    value: Any = 1
    for _ in range(64):
        value = [value]
    json_limits.check(value)
    with pytest.raises(errors.ValidationFailed):
        json_limits.check([value])
    # a self-referencing value ends at the depth limit, not in a RecursionError
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(errors.ValidationFailed):
        json_limits.check(loop)


# --- properties --------------------------------------------------------------------------------

storable_text = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="\x00"), max_size=20
)
storable = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**256), max_value=2**256)
    | st.floats(allow_nan=False, allow_infinity=False)
    | storable_text,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(storable_text, inner, max_size=5),
    max_leaves=30,
)


@settings(max_examples=200, deadline=None)
@given(storable)
def test_storable_values_round_trip(value: Any) -> None:
    json_limits.check(value)
    assert json_limits.loads(json.dumps(value)) == value
    assert json_limits.loads(json.dumps(value, ensure_ascii=False).encode()) == value


poison = st.sampled_from(
    [float("nan"), float("inf"), -float("inf"), 2**256 + 1, -(2**300), "a\x00", "\ud800", "\udfff"]
)


@st.composite
def poisoned(draw: st.DrawFn) -> tuple[Any, str]:
    """A storable value with one poison planted at a random place, and that place's path."""
    steps = draw(st.lists(st.one_of(st.integers(0, 3), storable_text), max_size=6))
    value: Any = draw(poison)
    path = ""
    for step in reversed(steps):
        if isinstance(step, int):
            fill = draw(st.lists(st.integers(0, 9), min_size=step, max_size=step))
            value = [*fill, value]
        else:
            value = {step: value}
    # rebuild the path from the top
    node: Any = value
    while isinstance(node, list | dict):
        if isinstance(node, list):
            path += f"[{len(node) - 1}]"
            node = node[-1]
        else:
            (key,) = node
            path = json_limits._join_key(path, key)
            node = node[key]
    return value, path or "$"


@settings(max_examples=200, deadline=None)
@given(poisoned())
def test_poison_is_found_wherever_it_hides(case: tuple[Any, str]) -> None:
    value, path = case
    with pytest.raises(errors.ValidationFailed) as info:
        json_limits.check(value)
    assert info.value.field == path
    # the same through the parser (json.dumps writes NaN/Infinity and escapes the rest)
    with pytest.raises(errors.ValidationFailed) as info:
        json_limits.loads(json.dumps(value))
    assert info.value.field == path


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200) | st.text(max_size=200))
def test_loads_raises_only_domain_errors(body: bytes | str) -> None:
    try:
        json_limits.loads(body)
    except (errors.MalformedBody, errors.ValidationFailed):
        pass
