"""Who may deploy and trigger a DAG (``trace_core.access.check_deploy`` / ``check_trigger``):
every kind of caller against a new DAG and an existing one."""

from __future__ import annotations

import pytest

from trace_core import errors
from trace_core.access import UserCaller, check_deploy, check_trigger

ORG, OTHER, DAG = "org-1", "org-2", "dag-1"


def user(
    subject: str, *roles: str, org: str = ORG, dags: tuple[str, ...] = (), member: bool = True
) -> UserCaller:
    return UserCaller(subject, org, frozenset(roles), frozenset(dags), member)


#: caller -> (deploy a new DAG, deploy DAG (deployers: dave), trigger DAG)
CASES = {
    "admin": (user("alice", "admin"), "ok", "ok", "ok"),
    "dag_deployer member": (user("dora", "dag_deployer"), "ok", "ok", "ok"),
    "the DAG's deployer": (user("dave", dags=(DAG,)), "forbidden", "ok", "ok"),
    "the DAG's deployer, not a member": (
        user("dave", dags=(DAG,), member=False),
        "forbidden",
        "ok",
        "ok",
    ),
    "the DAG's triggerer": (user("tess", dags=(DAG,)), "forbidden", "forbidden", "ok"),
    "member without role": (user("bob", "analyst"), "forbidden", "forbidden", "forbidden"),
    "non-member holding admin": (
        user("mal", "admin", member=False),
        "not_found",
        "not_found",
        "not_found",
    ),
    "another org's admin": (user("eve", "admin", org=OTHER), "not_found", "not_found", "not_found"),
}


def outcome(fn: object, *args: object) -> str:
    try:
        fn(*args)  # type: ignore[operator]
    except errors.NotFound:
        return "not_found"
    except errors.Forbidden:
        return "forbidden"
    return "ok"


@pytest.mark.parametrize("name", list(CASES))
def test_deploy_and_trigger_matrix(name: str) -> None:
    caller, new_dag, existing, trigger = CASES[name]
    assert outcome(check_deploy, caller, ORG, frozenset()) == new_dag
    assert outcome(check_deploy, caller, ORG, frozenset({"dave"})) == existing
    assert outcome(check_trigger, caller, ORG, DAG) == trigger
