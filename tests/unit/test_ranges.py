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
    with pytest.raises(Gap, match=r"waiting for \[200, 300\)"):
        aggregate(s2, 300, 400, 100)
    with pytest.raises(Overlap):
        aggregate(s2, 180, 260, 100)
    assert AggregatorState.from_doc(s2.to_doc()) == s2
    assert AggregatorState.from_doc(AggregatorState().to_doc()) == AggregatorState()
    # a state written before windows were announced again reads as its prefix
    assert AggregatorState.from_doc({"next": 7, "last": [0, 7], "last_windows": []}).next == 7


def test_a_range_committed_again_reannounces_exactly_its_announced_windows() -> None:
    state = AggregatorState(0)
    for at in range(0, 140, 20):  # ranges of 20 blocks up to 140; windows of 60
        state, _ = aggregate(state, at, at + 20, 60)
    assert state.next == 140
    # a reorged 40_60 re-extracted: its window 0_60 again, nothing else, the prefix unchanged
    again, windows = aggregate(state, 40, 60, 60, source=("ingest-2", "windows-9"))
    assert windows == [(0, 60)] and again.next == 140
    # a range straddling two announced windows gets both; one in the open window 120_180 none
    assert aggregate(state, 50, 70, 60)[1] == [(0, 60), (60, 120)]
    assert aggregate(state, 120, 140, 60)[1] == []
    # below origin nothing was ever announced
    late = AggregatorState(120)
    late, _ = aggregate(late, 120, 180, 60)
    assert aggregate(late, 100, 130, 60, origin=120)[1] == [(120, 180)]
    assert aggregate(late, 0, 60, 60, origin=120)[1] == []
    # once per committing task: another chunk of the same re-extract (another consuming task)
    # in the same window announces nothing more; the retry of the consuming task that
    # announced it announces it again; another re-extract announces it again
    assert aggregate(again, 20, 40, 60, source=("ingest-2", "windows-10")) == (again, [])
    assert aggregate(again, 40, 60, 60, source=("ingest-2", "windows-9")) == (again, [(0, 60)])
    third, windows = aggregate(again, 40, 60, 60, source=("ingest-3", "windows-11"))
    assert windows == [(0, 60)] and third.next == 140
    assert AggregatorState.from_doc(third.to_doc()) == third
    # fresh input after it follows the ordering rules unchanged
    assert aggregate(third, 140, 180, 60)[1] == [(120, 180)]
    with pytest.raises(Gap):
        aggregate(third, 200, 220, 60)


@given(st.lists(st.integers(1, 300), min_size=1, max_size=20), st.integers(1, 250), st.data())
def test_any_covered_range_again_gets_the_announced_windows_holding_it(
    sizes: list[int], w: int, data: st.DataObject
) -> None:
    state, at = AggregatorState(), 0
    for size in sizes:
        state, _ = aggregate(state, at, at + size, w)
        at += size
    start = data.draw(st.integers(0, at - 1))
    end = data.draw(st.integers(start + 1, at))
    new, windows = aggregate(state, start, end, w)
    assert new == state
    announced = {(k * w, (k + 1) * w) for k in range(at // w)}
    holding = {x for x in announced if x[0] < end and start < x[1]}
    assert windows == sorted(holding)
