"""Who may read, overwrite and purge a dataset: the permission rules, as pure functions.

Rules (``docs/architecture/data_versioning.md``, "Permissions"):

* nothing crosses orgs: a caller of another org may do nothing, whatever its roles there;
* org admins (role ``admin`` in ``org_members``) may read, overwrite and purge;
* deployers and triggerers of the producing DAG may read and overwrite (cut over / roll back
  the pointers of the datasets it produces), not purge;
* empty ``read_roles``: the dataset is private to those two groups; non-empty: members holding
  any of those roles may also read;
* a task reads only the datasets its capability token grants (``grants.datasets.read``, a list
  of dataset names of the token's org); tasks never overwrite or purge through this path (they
  write through the commit protocol, ``trace_core.commit``).

Roles and DAG membership come from Postgres, never from a user token; callers are built by the
store and passed in.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any, assert_never

import attrs

from trace_core import errors

#: The org role that makes a member an org admin.
ADMIN_ROLE = "admin"


class Action(enum.StrEnum):
    READ = "read"
    OVERWRITE = "overwrite"
    PURGE = "purge"


@attrs.frozen
class UserCaller:
    """An authenticated end user, with their membership in one org (from Postgres)."""

    subject: str
    #: The org the request is about; ``roles``/``dags`` describe the user's membership in it.
    org_id: str
    roles: frozenset[str] = frozenset()
    #: DAG ids the user deploys or triggers in this org.
    dags: frozenset[str] = frozenset()
    #: Whether the subject is a member of the org at all.
    member: bool = True

    @property
    def is_admin(self) -> bool:
        return ADMIN_ROLE in self.roles


@attrs.frozen
class TaskCaller:
    """A task attempt, identified by its capability token."""

    org_id: str
    task_id: str
    #: Dataset names the token grants for reading.
    read: frozenset[str] = frozenset()

    @classmethod
    def from_grants(cls, org_id: str, task_id: str, grants: Mapping[str, Any]) -> TaskCaller:
        """From a token's ``grants`` claim: ``{"datasets": {"read": ["name", ...]}}``."""
        datasets = grants.get("datasets")
        names = datasets.get("read") if isinstance(datasets, Mapping) else None
        read = (
            frozenset(n for n in names if isinstance(n, str))
            if isinstance(names, list)
            else frozenset()
        )
        return cls(org_id=org_id, task_id=task_id, read=read)


Caller = UserCaller | TaskCaller


@attrs.frozen
class DatasetAcl:
    """What the rules need to know about a dataset."""

    org_id: str
    name: str
    #: The producing DAG.
    dag_id: str
    read_roles: frozenset[str] = frozenset()


def allowed(caller: Caller, dataset: DatasetAcl, action: Action) -> bool:
    """Whether ``caller`` may perform ``action`` on ``dataset``. Never raises."""
    if caller.org_id != dataset.org_id:
        return False
    if isinstance(caller, TaskCaller):
        return action is Action.READ and dataset.name in caller.read
    if not caller.member:
        # Outside the org's member list only a DAG grant (itself an org-scoped row) counts,
        # and only for that DAG's datasets: roles of a non-member are never honoured.
        caller = attrs.evolve(caller, roles=frozenset())
    if caller.is_admin:
        return True
    producer = dataset.dag_id in caller.dags
    match action:
        case Action.READ:
            return producer or bool(dataset.read_roles & caller.roles)
        case Action.OVERWRITE:
            return producer
        case Action.PURGE:
            return False
        case _:
            assert_never(action)


def check(caller: Caller, dataset: DatasetAcl, action: Action) -> None:
    """Raise ``NotFound`` for a caller of another org or a non-member (nothing leaks across
    orgs) and
    ``Forbidden`` when ``allowed`` says no; return None otherwise."""
    outsider = isinstance(caller, UserCaller) and not caller.member and not caller.dags
    if caller.org_id != dataset.org_id or outsider:
        raise errors.NotFound("no such dataset", field="dataset")
    if not allowed(caller, dataset, action):
        raise errors.Forbidden(f"not allowed to {action.value} dataset {dataset.name!r}")


__all__ = [
    "ADMIN_ROLE",
    "Action",
    "Caller",
    "DatasetAcl",
    "TaskCaller",
    "UserCaller",
    "allowed",
    "check",
]
