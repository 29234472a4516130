"""The output commit protocol: how an attempt's staged objects become dataset partitions.

Theory of operation
-------------------
An attempt writes outputs only under its own *staging prefix*
(``org/{org_id}/staging/task/{task_id}/attempt/{n}/``). Its completion carries an *output
manifest*: one entry per staged object (dataset name, object key, size, sha256, and either a
block range ``{start, end}`` or a partition ``key``). The store applies the manifest to the
dataset versions **in the same transaction** as the completion, fenced on
``(task_id, attempt, lease_token)``. So:

1. A failed or stale attempt never commits: its completion is refused by the lifecycle fence,
   the transaction writes nothing, and its staged objects stay invisible (no partition names
   them) until the staging sweep deletes them after a grace period.
2. Every entry is checked before anything is written (``check_entry``): the key is safe
   (``trace_core.object_keys``), lies inside *this* attempt's staging prefix (not another
   attempt's, dataset's or org's), the object exists, and its size and sha256 match.
3. ``replace`` supersedes exactly the live partitions the new entry covers (whole partitions:
   a partial overlap is refused) and emits one invalidation for the rewritten scope; the first
   write of a range is not a rewrite and emits none.
4. ``append`` never supersedes: an entry whose range/key is already live is a duplicate and is
   stored once (dedupe by the partition's unique key).

A committed partition's object, as a table (``TRANSITIONS``, stored as
``dataset_partitions.state``)::

    committed ──verified──▶ promoted        (readers read the canonical copy)
        │
        └─────mismatched──▶ corrupt         (an alarm: the staged bytes changed or vanished)

A partition row is written ``committed`` by the completion; promotion reads the staged bytes,
checks them against the size and sha256 the manifest committed (``promotion_event``) and either
copies them to the canonical key (``promoted``) or marks the partition ``corrupt``; both are
final. Readers are handed ``promoted`` partitions only, so bytes changed after the commit never
reach a reader. Whether a partition is live (``superseded_at``), and the staged objects no
partition names (swept after a grace), are not states of this table.

Nothing here performs I/O or reads the clock: the store passes object metadata (from
``ObjectStore.head``) and the live partitions it read, and applies the returned ``CommitPlan``.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Mapping, Sequence
from typing import Final

import attrs

from trace_core import errors
from trace_core._diagram import state_diagram
from trace_core.object_keys import is_within, validate_key
from trace_core.ports import ObjectInfo


class PartitionState(enum.StrEnum):
    """Where a committed partition's object is, stored as ``dataset_partitions.state``."""

    #: Recorded by the completion; the bytes are still at the staged key. Not readable yet.
    COMMITTED = "committed"
    #: Verified and copied to the canonical key; readers read it there.
    PROMOTED = "promoted"
    #: The staged bytes no longer match what was committed (or are gone): never readable.
    CORRUPT = "corrupt"


class PartitionEvent(enum.StrEnum):
    #: Promotion read the staged bytes and they match the committed size and sha256.
    VERIFIED = "verified"
    #: They do not match, or the staged object is gone.
    MISMATCHED = "mismatched"


#: The partition transition table; pairs not in it are illegal.
TRANSITIONS: Final[Mapping[tuple[PartitionState, PartitionEvent], PartitionState]] = {
    (PartitionState.COMMITTED, PartitionEvent.VERIFIED): PartitionState.PROMOTED,
    (PartitionState.COMMITTED, PartitionEvent.MISMATCHED): PartitionState.CORRUPT,
}


def partition_target(state: PartitionState, event: PartitionEvent) -> PartitionState:
    """The state ``event`` moves a partition in ``state`` to. Raises ``Conflict`` if illegal."""
    target = TRANSITIONS.get((state, event))
    if target is None:
        raise errors.Conflict(f"{event.value} is not allowed for a {state.value} partition")
    return target


def promotion_event(size: int, sha256: str, staged: ObjectInfo | None) -> PartitionEvent:
    """What promotion found: ``staged`` describes the bytes it read at the staged key
    (``None``: the object is gone), ``size``/``sha256`` are what the completion committed.
    Returns ``VERIFIED`` only for an exact match. Never raises."""
    if staged is not None and staged.size == size and staged.sha256 == sha256:
        return PartitionEvent.VERIFIED
    return PartitionEvent.MISMATCHED


class UpdateStrategy(enum.StrEnum):
    """A dataset's ``update_strategy``, stored as ``datasets.update_strategy``."""

    REPLACE = "replace"
    APPEND = "append"


class VersionState(enum.StrEnum):
    """A dataset version's state, stored as ``dataset_versions.state``."""

    OPEN = "open"
    PURGED = "purged"


@attrs.frozen
class ManifestEntry:
    """One staged object an attempt's completion commits."""

    #: Dataset name (resolved in the task's org).
    dataset: str
    #: Where the attempt staged the object.
    object_key: str
    size: int
    sha256: str
    #: Block range ``[start, end)``; both or neither.
    start: int | None = None
    end: int | None = None
    #: Partition key, when the entry is not a block range.
    key: str | None = None
    #: Target version; ``None`` = the dataset's active version.
    version: str | None = None

    @property
    def scope(self) -> tuple[int, int] | str:
        if self.key is not None:
            return self.key
        assert self.start is not None and self.end is not None
        return (self.start, self.end)


@attrs.frozen
class Target:
    """The dataset version an entry lands in, as the store resolved it."""

    org_id: str
    dataset_uuid: str
    dataset_version: str
    update_strategy: UpdateStrategy
    version_state: VersionState = VersionState.OPEN


@attrs.frozen
class LivePartition:
    """A live (not superseded) partition of a version."""

    partition_id: int
    dataset_version: str
    start: int | None
    end: int | None
    key: str | None


@attrs.frozen
class PlannedPartition:
    entry_index: int
    dataset_version: str
    start: int | None
    end: int | None
    key: str | None
    #: The canonical location under the version's prefix.
    object_key: str
    #: Where the attempt staged it.
    staged_key: str
    size: int
    sha256: str


@attrs.frozen
class Invalidation:
    """Downstream must recompute this scope of this version (emitted for a replace rewrite)."""

    dataset_uuid: str
    dataset_version: str
    start: int | None
    end: int | None
    key: str | None
    #: Partitions the rewrite superseded.
    superseded: int


@attrs.frozen
class CommitPlan:
    inserts: tuple[PlannedPartition, ...]
    #: Partition ids to mark superseded.
    supersede: tuple[int, ...]
    invalidations: tuple[Invalidation, ...]
    #: Append entries skipped because their key was already live (stored once).
    duplicates: int


def version_prefix(org_id: str, dataset_uuid: str, dataset_version: str) -> str:
    """The object prefix of a dataset version (UUIDs only, never the dataset name)."""
    return f"org/{org_id}/dataset/{dataset_uuid}/version/{dataset_version}/"


def canonical_key(target: Target, entry: ManifestEntry, task_id: str, attempt: int) -> str:
    """Where a committed partition lives under its version's prefix.

    Block ranges keep ``{start}_{end}`` in the name (Cryo style); key partitions use a digest of
    the key (keys may hold ``/``). The attempt is part of the name, so a replace never
    overwrites the object a pinned reader may still read.
    """
    leaf = entry.object_key.rsplit("/", 1)[-1]
    suffix = leaf.split(".", 1)[1] if "." in leaf else "bin"
    if entry.key is not None:
        scope = "key_" + hashlib.sha256(entry.key.encode()).hexdigest()[:32]
    else:
        scope = f"{entry.start}_{entry.end}"
    prefix = version_prefix(target.org_id, target.dataset_uuid, target.dataset_version)
    return validate_key(f"{prefix}{scope}.{task_id}.a{attempt}.{suffix}")


def check_entry(
    entry: ManifestEntry, index: int, *, staging_prefix: str, head: ObjectInfo | None
) -> None:
    """Check one manifest entry against the attempt's staging prefix and the stored object.

    ``head`` is the object's metadata (``None``: it does not exist). Raises ``UnsafeKey``
    (unsafe key, or outside the staging prefix), ``ValidationFailed`` (missing object, size or
    checksum mismatch, bad range/key), all with ``field="outputs[i]..."``.
    """
    where = f"outputs[{index}]"
    try:
        validate_key(entry.object_key)
    except errors.UnsafeKey as exc:
        raise errors.UnsafeKey(exc.message, field=f"{where}.object_key") from None
    if not is_within(entry.object_key, staging_prefix):
        raise errors.UnsafeKey(
            f"object_key must lie under this attempt's staging prefix {staging_prefix}",
            field=f"{where}.object_key",
        )
    has_range = entry.start is not None or entry.end is not None
    if has_range == (entry.key is not None):
        raise errors.ValidationFailed(
            "a partition is either a range {start, end} or a key", field=f"{where}.partition"
        )
    if has_range:
        if entry.start is None or entry.end is None or not 0 <= entry.start < entry.end:
            raise errors.ValidationFailed(
                "partition range needs 0 <= start < end", field=f"{where}.partition"
            )
    if head is None:
        raise errors.ValidationFailed(
            "the staged object does not exist", field=f"{where}.object_key"
        )
    if head.size != entry.size:
        raise errors.ValidationFailed(
            "size does not match the staged object", field=f"{where}.size"
        )
    if head.sha256 != entry.sha256:
        raise errors.ValidationFailed(
            "sha256 does not match the staged object", field=f"{where}.sha256"
        )


def _overlaps(p: LivePartition, start: int, end: int) -> bool:
    return p.start is not None and p.end is not None and p.start < end and p.end > start


def plan_commit(
    entries: Sequence[ManifestEntry],
    targets: Sequence[Target],
    live: Sequence[LivePartition],
    *,
    task_id: str,
    attempt: int,
) -> CommitPlan:
    """Decide what a manifest writes. ``targets[i]`` is where ``entries[i]`` lands; ``live``
    holds the live partitions of those versions that any entry's scope touches.

    Returns the plan. Raises ``Conflict`` (a target version is purged), ``ValidationFailed``
    (a replace partially overlaps a live partition; the same scope twice, or overlapping
    ranges, in one manifest for a replace dataset).
    """
    by_version: dict[str, list[LivePartition]] = {}
    for p in live:
        by_version.setdefault(p.dataset_version, []).append(p)
    inserts: list[PlannedPartition] = []
    supersede: list[int] = []
    invalidations: list[Invalidation] = []
    duplicates = 0
    seen: set[tuple[str, tuple[int, int] | str]] = set()
    #: block ranges this manifest writes into each replace version (they must not overlap)
    written: dict[str, list[tuple[int, int]]] = {}
    for i, (entry, target) in enumerate(zip(entries, targets, strict=True)):
        where = f"outputs[{i}]"
        if target.version_state is VersionState.PURGED:
            raise errors.Conflict("the target dataset version is purged", field=where)
        scope = (target.dataset_version, entry.scope)
        if scope in seen:
            if target.update_strategy is UpdateStrategy.APPEND:
                duplicates += 1
                continue
            raise errors.ValidationFailed(
                "the same partition twice in one manifest", field=f"{where}.partition"
            )
        seen.add(scope)
        if (
            target.update_strategy is UpdateStrategy.REPLACE
            and entry.start is not None
            and entry.end is not None
        ):
            mine = written.setdefault(target.dataset_version, [])
            if any(entry.start < e and s < entry.end for s, e in mine):
                raise errors.ValidationFailed(
                    "ranges of one replace manifest must not overlap", field=f"{where}.partition"
                )
            mine.append((entry.start, entry.end))
        version_live = by_version.get(target.dataset_version, [])
        if entry.key is not None:
            hit = [p for p in version_live if p.key == entry.key]
        else:
            assert entry.start is not None and entry.end is not None
            hit = [p for p in version_live if _overlaps(p, entry.start, entry.end)]
        match target.update_strategy:
            case UpdateStrategy.APPEND:
                if any(
                    p.key == entry.key and p.start == entry.start and p.end == entry.end
                    for p in hit
                ):
                    duplicates += 1
                    continue
            case UpdateStrategy.REPLACE:
                if entry.key is None:
                    assert entry.start is not None and entry.end is not None
                    partial = [
                        p
                        for p in hit
                        if not (entry.start <= (p.start or 0) and (p.end or 0) <= entry.end)
                    ]
                    if partial:
                        raise errors.ValidationFailed(
                            "replace must cover whole live partitions "
                            f"(overlaps [{partial[0].start}, {partial[0].end}))",
                            field=f"{where}.partition",
                        )
                supersede.extend(p.partition_id for p in hit)
                if hit:
                    invalidations.append(
                        Invalidation(
                            dataset_uuid=target.dataset_uuid,
                            dataset_version=target.dataset_version,
                            start=entry.start,
                            end=entry.end,
                            key=entry.key,
                            superseded=len(hit),
                        )
                    )
                # a superseded partition no longer blocks later entries of this manifest
                if hit:
                    gone = {p.partition_id for p in hit}
                    by_version[target.dataset_version] = [
                        p for p in version_live if p.partition_id not in gone
                    ]
        inserts.append(
            PlannedPartition(
                entry_index=i,
                dataset_version=target.dataset_version,
                start=entry.start,
                end=entry.end,
                key=entry.key,
                object_key=canonical_key(target, entry, task_id, attempt),
                staged_key=entry.object_key,
                size=entry.size,
                sha256=entry.sha256,
            )
        )
    return CommitPlan(tuple(inserts), tuple(supersede), tuple(invalidations), duplicates)


def mermaid_diagram() -> str:
    """The partition state diagram in Mermaid syntax, drawn from ``TRANSITIONS``."""
    return state_diagram(TRANSITIONS, initial=["committed: commit"], final=["promoted", "corrupt"])


__all__ = [
    "TRANSITIONS",
    "CommitPlan",
    "Invalidation",
    "LivePartition",
    "ManifestEntry",
    "PartitionEvent",
    "PartitionState",
    "PlannedPartition",
    "Target",
    "UpdateStrategy",
    "VersionState",
    "canonical_key",
    "check_entry",
    "mermaid_diagram",
    "partition_target",
    "plan_commit",
    "promotion_event",
    "version_prefix",
]
