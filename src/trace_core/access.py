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
  write through the commit protocol, ``trace_core.commit``);
* a reader's pin (written by a resolve) is released only by its holder or an admin of the
  pin's org, and only through that org (``check_release``).

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
#: The org role that may deploy DAGs: new ones, and new versions of any DAG of the org.
DAG_DEPLOYER_ROLE = "dag_deployer"


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


@attrs.frozen
class PinAcl:
    """What the rules need to know about a reader's pin."""

    #: The org of the pinned versions.
    org_id: str
    #: Who holds it (``pin_holder`` of the caller that resolved).
    holder: str


def pin_holder(caller: Caller) -> str:
    """The holder name a pin records for ``caller``: ``user/{subject}`` or ``task/{task_id}``
    (distinct prefixes, so a user subject can never pass for a task)."""
    if isinstance(caller, TaskCaller):
        return f"task/{caller.task_id}"
    return f"user/{caller.subject}"


def _outsider(caller: Caller) -> bool:
    return isinstance(caller, UserCaller) and not caller.member and not caller.dags


def check_release(caller: Caller, pin: PinAcl) -> None:
    """Whether ``caller`` may release ``pin``: its holder, or an admin of the pin's org.

    Returns None. Raises ``NotFound`` for a caller of another org or a non-member (the pin's
    existence does not leak), ``Forbidden`` for a member who neither holds it nor is an admin.
    """
    if caller.org_id != pin.org_id or _outsider(caller):
        raise errors.NotFound("no such pin", field="pin_id")
    if pin_holder(caller) == pin.holder:
        return
    if isinstance(caller, UserCaller) and caller.member and caller.is_admin:
        return
    raise errors.Forbidden("only the pin's holder or an org admin may release it")


def check(caller: Caller, dataset: DatasetAcl, action: Action) -> None:
    """Raise ``NotFound`` for a caller of another org or a non-member (nothing leaks across
    orgs) and
    ``Forbidden`` when ``allowed`` says no; return None otherwise."""
    if caller.org_id != dataset.org_id or _outsider(caller):
        raise errors.NotFound("no such dataset", field="dataset")
    if not allowed(caller, dataset, action):
        raise errors.Forbidden(f"not allowed to {action.value} dataset {dataset.name!r}")


def _manages_dags(caller: UserCaller, org_id: str) -> bool:
    """Whether ``caller`` deploys and triggers every DAG of ``org_id``: an org admin or a
    ``dag_deployer`` member. Raises ``NotFound`` for a caller of another org or an outsider."""
    if caller.org_id != org_id or _outsider(caller):
        raise errors.NotFound("no such org", field="org")
    return caller.member and (caller.is_admin or DAG_DEPLOYER_ROLE in caller.roles)


def check_deploy(caller: UserCaller, org_id: str, deployers: frozenset[str]) -> None:
    """Whether ``caller`` may deploy a version of a DAG of ``org_id`` whose deployers
    (``dag_members`` relation ``deployer``) are ``deployers`` (empty for a new DAG): org admins,
    members with the ``dag_deployer`` role, and the DAG's own deployers.

    Returns None. Raises ``NotFound`` for a caller of another org or an outsider,
    ``Forbidden`` otherwise.
    """
    if _manages_dags(caller, org_id) or caller.subject in deployers:
        return
    raise errors.Forbidden("only org admins, dag_deployer members and the DAG's deployers deploy")


def check_trigger(caller: UserCaller, org_id: str, dag_id: str) -> None:
    """Whether ``caller`` may run a job of DAG ``dag_id`` by hand: org admins, ``dag_deployer``
    members, and the DAG's deployers and triggerers (``caller.dags``).

    Returns None. Raises ``NotFound`` for a caller of another org or an outsider,
    ``Forbidden`` otherwise.
    """
    if _manages_dags(caller, org_id) or dag_id in caller.dags:
        return
    raise errors.Forbidden("only the DAG's deployers and triggerers (or org admins) trigger it")


__all__ = [
    "ADMIN_ROLE",
    "DAG_DEPLOYER_ROLE",
    "Action",
    "Caller",
    "DatasetAcl",
    "PinAcl",
    "TaskCaller",
    "UserCaller",
    "allowed",
    "check",
    "check_deploy",
    "check_release",
    "check_trigger",
    "pin_holder",
]
