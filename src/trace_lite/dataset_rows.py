"""The rows of the dataset queries (``sql/datasets.sql``), read by name.

Each class is one query's columns (``pg.fetch_as`` builds it by name), so reordering a
``SELECT`` cannot shift a value into the wrong field. Rows that carry a dataset's ACL fields
hand the kernel its ``DatasetAcl`` (``trace_core.access``) through ``acl``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import attrs

from trace_core.access import DatasetAcl


@attrs.frozen
class DatasetRow:
    """One dataset with its ACL fields and producer metadata (``dataset_by_name``)."""

    dataset_uuid: str
    name: str
    dag_id: str
    read_roles: list[str]
    storage_kind: str
    update_strategy: str
    unique_key: list[str]
    job_name: str
    output_index: int
    schema: Any
    #: The producing DAG's name.
    dag: str

    def acl(self, org_id: str) -> DatasetAcl:
        return DatasetAcl(org_id, self.name, self.dag_id, frozenset(self.read_roles))


@attrs.frozen
class ListedRow:
    dataset_uuid: str
    name: str
    dag_id: str
    read_roles: list[str]
    storage_kind: str
    update_strategy: str
    dag: str
    active_version: str | None

    def acl(self, org_id: str) -> DatasetAcl:
        return DatasetAcl(org_id, self.name, self.dag_id, frozenset(self.read_roles))


@attrs.frozen
class VersionRow:
    dataset_version: str
    state: str
    created_at: datetime
    purged_at: datetime | None
    live_partitions: int
    active: bool
    pins: int


@attrs.frozen
class PointerSetRow:
    generation: int
    parent_generation: int | None
    created_by: str
    created_at: datetime
    active: bool
    pointers: dict[str, str]


@attrs.frozen
class DagLockRow:
    dag_id: str
    active_generation: int | None


@attrs.frozen
class DagIdRow:
    dag_id: str


@attrs.frozen
class UuidRow:
    dataset_uuid: str


@attrs.frozen
class NewVersionRow:
    dataset_version: str


@attrs.frozen
class ReadRolesRow:
    read_roles: list[str]


@attrs.frozen
class CutoverRow:
    """A named dataset of a cutover, with the state of the version it names."""

    name: str
    dataset_uuid: str
    #: ``None`` when the version is not one of this dataset's.
    dataset_version: str | None
    state: str | None


@attrs.frozen
class GenerationRow:
    generation: int


@attrs.frozen
class ParentRow:
    parent_generation: int | None
    names_purged: bool


@attrs.frozen
class TaskOrgRow:
    org_id: str
    org_name: str
    #: The task's DAG and the staged pointer set it reads that DAG's datasets through (a
    #: rebuild, ``trace_lite.dag_remat``); None: the active sets.
    staged_dag_id: str | None = None
    staged_generation: int | None = None


@attrs.frozen
class ResolveRow:
    name: str
    dataset_uuid: str
    dag_id: str
    read_roles: list[str]
    storage_kind: str
    dataset_version: str | None
    version_state: str | None

    def acl(self, org_id: str) -> DatasetAcl:
        return DatasetAcl(org_id, self.name, self.dag_id, frozenset(self.read_roles))


@attrs.frozen
class PartitionRow:
    """A live partition of a version, as resolve sees it (``version_objects``)."""

    dataset_version: str
    state: str
    object_key: str
    start: int | None
    end: int | None
    key: str | None
    size: int

    def for_reader(self) -> dict[str, Any]:
        scope: dict[str, Any] = (
            {"key": self.key} if self.key is not None else {"start": self.start, "end": self.end}
        )
        return {"object_key": self.object_key, "size": self.size, **scope}


@attrs.frozen
class PinRow:
    holder: str
    org_id: str


@attrs.frozen
class PurgeLockRow:
    state: str
    active: bool
    staged: bool
    pinned: bool


@attrs.frozen
class PurgedPartitionRow:
    partition_id: int
    object_key: str
    staged_key: str


__all__ = [
    "CutoverRow",
    "DagIdRow",
    "DagLockRow",
    "DatasetRow",
    "GenerationRow",
    "ListedRow",
    "NewVersionRow",
    "ParentRow",
    "PartitionRow",
    "PinRow",
    "PointerSetRow",
    "PurgeLockRow",
    "PurgedPartitionRow",
    "ReadRolesRow",
    "ResolveRow",
    "TaskOrgRow",
    "UuidRow",
    "VersionRow",
]
