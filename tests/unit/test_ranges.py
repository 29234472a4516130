"""``trace_core.ranges``: deterministic windows, the splitter and the ordered aggregator."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trace_core.ranges import AggregatorState, Gap, Overlap, aggregate, split


def test_split_cuts_at_window_boundaries() -> None:
    assert split(0, 25_000, 10_000) == [(0, 10_000), (10_000, 20_000), (20_000, 25_000)]
    assert split(95, 105, 100) == [(95, 100), (100, 105)]
    assert split(100, 200, 100) == [(100, 200)]
    with pytest.raises(ValueError):
        split(5, 5, 10)
    with pytest.raises(ValueError):
        split(0, 5, 0)


@given(st.integers(0, 10_000), st.integers(1, 5_000), st.integers(1, 700))
def test_split_covers_the_range_exactly_with_aligned_cuts(start: int, n: int, w: int) -> None:
    pieces = split(start, start + n, w)
    assert pieces[0][0] == start and pieces[-1][1] == start + n
    assert all(a < b for a, b in pieces)
    assert all(b == c for (_, b), (c, _) in itertools.pairwise(pieces))
    assert all(b % w == 0 for _, b in pieces[:-1])
    assert all(b - a <= w for a, b in pieces)


@given(st.lists(st.integers(1, 300), min_size=1, max_size=30), st.integers(1, 250))
def test_ordered_inputs_announce_each_complete_window_once(sizes: list[int], w: int) -> None:
    state, at, announced = AggregatorState(), 0, []
    for size in sizes:
        state, windows = aggregate(state, at, at + size, w)
        announced += windows
        at += size
    assert announced == [(k * w, (k + 1) * w) for k in range(at // w)]
    assert state.next == at


def test_replays_gaps_and_overlaps() -> None:
    s1, w1 = aggregate(AggregatorState(), 0, 150, 100)
    assert w1 == [(0, 100)]
    # the retry of the last input (its completion lost) re-announces the same windows
    assert aggregate(s1, 0, 150, 100) == (s1, [(0, 100)])
    s2, w2 = aggregate(s1, 150, 200, 100)
    assert w2 == [(100, 200)]
    # an older input already covered: acknowledged, nothing announced, state unchanged
    assert aggregate(s2, 0, 150, 100) == (s2, [])
    with pytest.raises(Gap, match=r"waiting for \[200, 300\)"):
        aggregate(s2, 300, 400, 100)
    with pytest.raises(Overlap):
        aggregate(s2, 180, 260, 100)
    assert AggregatorState.from_doc(s2.to_doc()) == s2
    assert AggregatorState.from_doc(AggregatorState().to_doc()) == AggregatorState()
