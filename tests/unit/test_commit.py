"""The output commit protocol: the partition table, manifest checks, replace/append planning."""

from __future__ import annotations

import hashlib
import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trace_core import errors
from trace_core.commit import (
    TRANSITIONS,
    Invalidation,
    LivePartition,
    ManifestEntry,
    PartitionEvent,
    PartitionState,
    Target,
    UpdateStrategy,
    VersionState,
    canonical_key,
    check_entry,
    mermaid_diagram,
    partition_target,
    plan_commit,
    version_prefix,
)
from trace_core.ports import ObjectInfo

S, E = PartitionState, PartitionEvent
SHA = "a" * 64
STAGING = "org/o1/staging/task/t1/attempt/2/"
VERSION = "v-1"
OTHER_VERSION = "v-2"

#: The table as docs/architecture/data_versioning.md draws it (independent of ``TRANSITIONS``).
EXPECTED: dict[tuple[PartitionState, PartitionEvent], PartitionState] = {
    (S.COMMITTED, E.VERIFIED): S.PROMOTED,
    (S.COMMITTED, E.MISMATCHED): S.CORRUPT,
}


def entry(
    start: int | None = None,
    end: int | None = None,
    *,
    key: str | None = None,
    object_key: str = STAGING + "out.parquet",
    size: int = 10,
    sha256: str = SHA,
    dataset: str = "blocks",
) -> ManifestEntry:
    return ManifestEntry(
        dataset=dataset,
        object_key=object_key,
        size=size,
        sha256=sha256,
        start=start,
        end=end,
        key=key,
    )


def target(
    strategy: UpdateStrategy, version: str = VERSION, state: VersionState = VersionState.OPEN
) -> Target:
    return Target(
        org_id="o1",
        dataset_uuid="d-uuid",
        dataset_version=version,
        update_strategy=strategy,
        version_state=state,
    )


def head(e: ManifestEntry) -> ObjectInfo:
    return ObjectInfo(key=e.object_key, size=e.size, sha256=e.sha256)


def plan(
    entries: list[ManifestEntry],
    strategy: UpdateStrategy,
    live: list[LivePartition],
    version: str = VERSION,
):
    return plan_commit(
        entries, [target(strategy, version)] * len(entries), live, task_id="t1", attempt=2
    )


# --- the table --------------------------------------------------------------------------------


def test_table_is_the_documented_one() -> None:
    assert dict(TRANSITIONS) == EXPECTED


@pytest.mark.parametrize(("state", "event"), list(itertools.product(S, E)))
def test_every_pair_is_legal_or_refused(state: PartitionState, event: PartitionEvent) -> None:
    expected = EXPECTED.get((state, event))
    if expected is None:
        with pytest.raises(errors.Conflict) as exc:
            partition_target(state, event)
        assert type(exc.value) is errors.Conflict
        assert event.value in exc.value.message and state.value in exc.value.message
    else:
        assert partition_target(state, event) is expected


def test_promoted_and_corrupt_are_final() -> None:
    for state in (S.PROMOTED, S.CORRUPT):
        for event in E:
            with pytest.raises(errors.Conflict):
                partition_target(state, event)


def test_diagram_names_every_transition() -> None:
    diagram = mermaid_diagram()
    for (state, event), to in EXPECTED.items():
        assert f"    {state.value} --> {to.value}: {event.value}" in diagram


def test_the_stored_states_are_the_ones_the_migration_allows() -> None:
    from pathlib import Path

    import trace_lite

    folder = Path(trace_lite.__file__).parent / "sql" / "migrations"
    (sql,) = [p.read_text() for p in folder.glob("*_partition_state.sql")]
    allowed = "(" + ", ".join(f"'{s.value}'" for s in S) + ")"
    assert f"CHECK (state IN {allowed})" in sql


@pytest.mark.parametrize(
    ("staged", "event"),
    [
        (ObjectInfo("k", 10, SHA), E.VERIFIED),
        (ObjectInfo("k", 10, "b" * 64), E.MISMATCHED),  # same size, other bytes
        (ObjectInfo("k", 11, SHA), E.MISMATCHED),
        (None, E.MISMATCHED),  # the staged object is gone
    ],
)
def test_promotion_verifies_what_was_committed(staged: ObjectInfo | None, event: object) -> None:
    from trace_core.commit import promotion_event

    assert promotion_event(10, SHA, staged) is event


# --- check_entry ------------------------------------------------------------------------------


def test_check_entry_accepts_a_good_range_and_a_good_key() -> None:
    for e in (
        entry(0, 100),
        entry(key="2026-01-01"),
        entry(0, 1, object_key=STAGING + "sub/dir/part.parquet"),
    ):
        assert check_entry(e, 0, staging_prefix=STAGING, head=head(e)) is None


@pytest.mark.parametrize(
    "object_key",
    [
        "../x",
        STAGING + "../3/out",
        STAGING + "a//b",
        STAGING + "a%2e",
        "/" + STAGING + "x",
        STAGING + "a\\b",
        STAGING + "a\x00b",
    ],
)
def test_check_entry_refuses_unsafe_keys(object_key: str) -> None:
    e = entry(0, 1, object_key=object_key)
    with pytest.raises(errors.UnsafeKey) as exc:
        check_entry(e, 3, staging_prefix=STAGING, head=head(e))
    assert exc.value.field == "outputs[3].object_key"


@pytest.mark.parametrize(
    "object_key",
    [
        "org/o1/staging/task/t1/attempt/1/out.parquet",  # another attempt
        "org/o1/staging/task/t1/attempt/20/out.parquet",  # prefix of the attempt number
        "org/o1/staging/task/t2/attempt/2/out.parquet",  # another task
        "org/o2/staging/task/t1/attempt/2/out.parquet",  # another org
        "org/o1/dataset/d-uuid/version/v-1/0_1.parquet",  # straight into a dataset
        "org/o1/staging/task/t1/attempt/2",  # the prefix itself, not inside it
        "out.parquet",
    ],
)
def test_check_entry_refuses_keys_outside_the_staging_prefix(object_key: str) -> None:
    e = entry(0, 1, object_key=object_key)
    with pytest.raises(errors.UnsafeKey) as exc:
        check_entry(e, 1, staging_prefix=STAGING, head=head(e))
    assert exc.value.field == "outputs[1].object_key"
    assert "staging prefix" in exc.value.message


def test_check_entry_refuses_unsafe_keys_before_looking_at_the_object() -> None:
    with pytest.raises(errors.UnsafeKey):
        check_entry(entry(0, 1, object_key="org/o2/x"), 0, staging_prefix=STAGING, head=None)


@pytest.mark.parametrize(
    "e",
    [
        entry(),  # neither range nor key
        entry(0, 10, key="k"),  # both
        entry(0, None, key="k"),
        entry(0, None),  # half a range
        entry(None, 10),
        entry(5, 5),  # empty
        entry(6, 5),  # reversed
        entry(-1, 5),  # negative
    ],
    ids=["neither", "both", "start+key", "start-only", "end-only", "empty", "reversed", "negative"],
)
def test_check_entry_refuses_bad_partitions(e: ManifestEntry) -> None:
    with pytest.raises(errors.ValidationFailed) as exc:
        check_entry(e, 2, staging_prefix=STAGING, head=head(e))
    assert type(exc.value) is errors.ValidationFailed
    assert exc.value.field == "outputs[2].partition"


def test_check_entry_refuses_a_missing_object() -> None:
    with pytest.raises(errors.ValidationFailed) as exc:
        check_entry(entry(0, 1), 4, staging_prefix=STAGING, head=None)
    assert type(exc.value) is errors.ValidationFailed
    assert exc.value.field == "outputs[4].object_key"


def test_check_entry_refuses_size_mismatch() -> None:
    e = entry(0, 1, size=10)
    with pytest.raises(errors.ValidationFailed) as exc:
        check_entry(
            e, 0, staging_prefix=STAGING, head=ObjectInfo(key=e.object_key, size=11, sha256=SHA)
        )
    assert exc.value.field == "outputs[0].size"


def test_check_entry_refuses_sha_mismatch() -> None:
    e = entry(0, 1)
    with pytest.raises(errors.ValidationFailed) as exc:
        check_entry(
            e,
            0,
            staging_prefix=STAGING,
            head=ObjectInfo(key=e.object_key, size=e.size, sha256="b" * 64),
        )
    assert exc.value.field == "outputs[0].sha256"


# --- canonical keys ---------------------------------------------------------------------------


def test_canonical_key_keeps_start_end_for_ranges() -> None:
    t = target(UpdateStrategy.REPLACE)
    key = canonical_key(t, entry(100, 200, object_key=STAGING + "x.parquet"), "t1", 2)
    assert key == "org/o1/dataset/d-uuid/version/v-1/100_200.t1.a2.parquet"
    assert key.startswith(version_prefix("o1", "d-uuid", "v-1"))


def test_canonical_key_digests_partition_keys_and_defaults_suffix() -> None:
    t = target(UpdateStrategy.APPEND)
    key = canonical_key(t, entry(key="a/b/../c", object_key=STAGING + "noext"), "t1", 3)
    digest = hashlib.sha256(b"a/b/../c").hexdigest()[:32]
    assert key == f"org/o1/dataset/d-uuid/version/v-1/key_{digest}.t1.a3.bin"


def test_canonical_keys_of_two_attempts_differ() -> None:
    t, e = target(UpdateStrategy.REPLACE), entry(0, 10)
    assert canonical_key(t, e, "t1", 1) != canonical_key(t, e, "t1", 2)


def test_planned_object_keys_keep_start_end() -> None:
    p = plan([entry(7, 9, object_key=STAGING + "o.tar.gz")], UpdateStrategy.REPLACE, [])
    (ins,) = p.inserts
    assert ins.object_key.rsplit("/", 1)[-1] == "7_9.t1.a2.tar.gz"
    assert ins.staged_key == STAGING + "o.tar.gz"
    assert (ins.start, ins.end, ins.key, ins.size, ins.sha256) == (7, 9, None, 10, SHA)


# --- plan_commit: replace ---------------------------------------------------------------------


def live(
    pid: int,
    start: int | None = None,
    end: int | None = None,
    key: str | None = None,
    version: str = VERSION,
) -> LivePartition:
    return LivePartition(partition_id=pid, dataset_version=version, start=start, end=end, key=key)


def test_replace_first_write_is_not_a_rewrite() -> None:
    p = plan([entry(0, 10)], UpdateStrategy.REPLACE, [live(1, 10, 20)])
    assert (p.supersede, p.invalidations, p.duplicates) == ((), (), 0)
    assert len(p.inserts) == 1


def test_replace_of_the_same_range_supersedes_it_and_invalidates_once() -> None:
    p = plan([entry(0, 10)], UpdateStrategy.REPLACE, [live(1, 0, 10), live(2, 10, 20)])
    assert p.supersede == (1,)
    assert p.invalidations == (Invalidation("d-uuid", VERSION, 0, 10, None, superseded=1),)


def test_replace_covering_several_whole_partitions_supersedes_them_all() -> None:
    p = plan(
        [entry(0, 30)],
        UpdateStrategy.REPLACE,
        [live(1, 0, 10), live(2, 10, 20), live(3, 20, 30), live(4, 30, 40)],
    )
    assert sorted(p.supersede) == [1, 2, 3]
    assert p.invalidations == (Invalidation("d-uuid", VERSION, 0, 30, None, superseded=3),)


@pytest.mark.parametrize(("start", "end"), [(5, 15), (0, 5), (5, 10), (0, 9), (9, 25)])
def test_replace_partially_overlapping_a_live_partition_is_refused(start: int, end: int) -> None:
    with pytest.raises(errors.ValidationFailed) as exc:
        plan([entry(20, 30), entry(start, end)], UpdateStrategy.REPLACE, [live(1, 0, 10)])
    assert exc.value.field == "outputs[1].partition"


def test_replace_ignores_other_versions() -> None:
    p = plan(
        [entry(0, 10)],
        UpdateStrategy.REPLACE,
        [live(1, 0, 10, version=OTHER_VERSION), live(2, 5, 15, version=OTHER_VERSION)],
    )
    assert (p.supersede, p.invalidations) == ((), ())


def test_replace_by_key_supersedes_the_same_key_only() -> None:
    p = plan(
        [entry(key="k1")],
        UpdateStrategy.REPLACE,
        [live(1, key="k1"), live(2, key="k2"), live(3, 0, 10)],
    )
    assert p.supersede == (1,)
    assert p.invalidations == (Invalidation("d-uuid", VERSION, None, None, "k1", superseded=1),)


def test_replace_same_scope_twice_in_one_manifest_is_refused() -> None:
    with pytest.raises(errors.ValidationFailed) as exc:
        plan([entry(0, 10), entry(0, 10)], UpdateStrategy.REPLACE, [])
    assert exc.value.field == "outputs[1].partition"


def test_purged_target_version_is_refused() -> None:
    with pytest.raises(errors.Conflict) as exc:
        plan_commit(
            [entry(0, 1), entry(1, 2)],
            [
                target(UpdateStrategy.APPEND),
                target(UpdateStrategy.APPEND, state=VersionState.PURGED),
            ],
            [],
            task_id="t1",
            attempt=1,
        )
    assert type(exc.value) is errors.Conflict
    assert exc.value.field == "outputs[1]"


@st.composite
def _segments(draw: st.DrawFn, bounds: st.SearchStrategy[list[int]]) -> list[tuple[int, int]]:
    """Non-overlapping ranges: a random subset of the segments between sorted boundaries."""
    points = sorted(set(draw(bounds)))
    segs = list(itertools.pairwise(points))
    keep = draw(st.lists(st.booleans(), min_size=len(segs), max_size=len(segs)))
    return [s for s, k in zip(segs, keep, strict=True) if k]


@st.composite
def _replace_case(draw: st.DrawFn) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    existing = draw(_segments(st.lists(st.integers(0, 40), max_size=12)))
    # rewrite boundaries: mostly existing boundaries, so exact and whole-cover rewrites are
    # common, plus a few random ones for partial overlaps
    known = sorted({b for r in existing for b in r})
    extra = st.integers(0, 40)
    pool = st.one_of(st.sampled_from(known), extra) if known else extra
    rewrites = draw(_segments(st.lists(pool, max_size=8)))
    draw(st.randoms()).shuffle(rewrites)
    return existing, rewrites


@given(_replace_case())
def test_replace_supersedes_exactly_the_covered_partitions(
    case: tuple[list[tuple[int, int]], list[tuple[int, int]]],
) -> None:
    existing, rewrites = case
    parts = [live(i, s, e) for i, (s, e) in enumerate(existing)]
    # the same ranges in another version must never be touched
    parts += [live(1000 + i, s, e, version=OTHER_VERSION) for i, (s, e) in enumerate(existing)]
    entries = [entry(s, e) for s, e in rewrites]

    def overlapping(s: int, e: int) -> list[int]:
        return [i for i, (ps, pe) in enumerate(existing) if ps < e and pe > s]

    def covered(s: int, e: int) -> list[int]:
        return [i for i, (ps, pe) in enumerate(existing) if s <= ps and pe <= e]

    refused = [j for j, (s, e) in enumerate(rewrites) if overlapping(s, e) != covered(s, e)]
    if refused:
        with pytest.raises(errors.ValidationFailed) as exc:
            plan(entries, UpdateStrategy.REPLACE, parts)
        assert exc.value.field == f"outputs[{refused[0]}].partition"
        return

    p = plan(entries, UpdateStrategy.REPLACE, parts)
    expected = [i for s, e in rewrites for i in covered(s, e)]
    assert sorted(p.supersede) == sorted(expected)
    assert len(set(p.supersede)) == len(p.supersede)
    assert all(pid < 1000 for pid in p.supersede)
    # an exact rewrite supersedes exactly the partition with that range
    for s, e in rewrites:
        if (s, e) in existing:
            assert covered(s, e) == [existing.index((s, e))]
    # one invalidation per rewritten scope that superseded something, none for first writes
    assert p.invalidations == tuple(
        Invalidation("d-uuid", VERSION, s, e, None, superseded=len(covered(s, e)))
        for s, e in rewrites
        if covered(s, e)
    )
    assert [(i.start, i.end) for i in p.inserts] == rewrites
    assert [i.entry_index for i in p.inserts] == list(range(len(rewrites)))
    assert p.duplicates == 0


# --- plan_commit: append ----------------------------------------------------------------------


def test_append_never_supersedes_and_dedupes_a_live_range() -> None:
    p = plan([entry(0, 10), entry(10, 20)], UpdateStrategy.APPEND, [live(1, 0, 10)])
    assert (p.supersede, p.invalidations, p.duplicates) == ((), (), 1)
    assert [(i.start, i.end, i.entry_index) for i in p.inserts] == [(10, 20, 1)]


def test_append_live_key_in_another_version_is_not_a_duplicate() -> None:
    p = plan([entry(key="k")], UpdateStrategy.APPEND, [live(1, key="k", version=OTHER_VERSION)])
    assert (len(p.inserts), p.duplicates) == (1, 0)


@given(
    keys=st.lists(st.sampled_from(["a", "b", "c", "d", "e/f", "2026-01-01"]), max_size=20),
    already=st.sets(st.sampled_from(["a", "b", "c", "d", "e/f", "2026-01-01"])),
)
def test_append_stores_each_key_once(keys: list[str], already: set[str]) -> None:
    parts = [live(i, key=k) for i, k in enumerate(sorted(already))]
    p = plan([entry(key=k) for k in keys], UpdateStrategy.APPEND, parts)
    fresh = list(dict.fromkeys(k for k in keys if k not in already))
    assert [i.key for i in p.inserts] == fresh
    assert [i.entry_index for i in p.inserts] == [keys.index(k) for k in fresh]
    assert p.duplicates == len(keys) - len(fresh)
    assert (p.supersede, p.invalidations) == ((), ())


@given(
    ranges=st.lists(st.sampled_from([(0, 10), (10, 20), (20, 30), (0, 30)]), max_size=12),
    already=st.sets(st.sampled_from([(0, 10), (10, 20), (20, 30), (0, 30)])),
)
def test_append_stores_each_range_once(
    ranges: list[tuple[int, int]], already: set[tuple[int, int]]
) -> None:
    parts = [live(i, s, e) for i, (s, e) in enumerate(sorted(already))]
    p = plan([entry(s, e) for s, e in ranges], UpdateStrategy.APPEND, parts)
    fresh = list(dict.fromkeys(r for r in ranges if r not in already))
    assert [(i.start, i.end) for i in p.inserts] == fresh
    assert p.duplicates == len(ranges) - len(fresh)
    assert (p.supersede, p.invalidations) == ((), ())


def test_overlapping_ranges_in_one_replace_manifest_are_refused() -> None:
    """Two entries [0,20) and [0,10) of one replace manifest would leave overlapping live
    partitions; the manifest is refused at the second entry."""
    with pytest.raises(errors.ValidationFailed) as info:
        plan(
            [entry(0, 20), entry(0, 10, object_key=STAGING + "b.parquet")],
            UpdateStrategy.REPLACE,
            [],
        )
    assert info.value.field == "outputs[1].partition"
    # adjacent ranges are fine
    ok = plan(
        [entry(0, 10), entry(10, 20, object_key=STAGING + "b.parquet")], UpdateStrategy.REPLACE, []
    )
    assert len(ok.inserts) == 2
