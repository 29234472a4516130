"""Dataset permission rules: the whole table, and nothing ever crosses orgs."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trace_core import errors
from trace_core.access import (
    ADMIN_ROLE,
    Action,
    DatasetAcl,
    TaskCaller,
    UserCaller,
    allowed,
    check,
)

ORG = "o1"
DAG = "dag-1"
NAME = "blocks"
R, W, P = Action.READ, Action.OVERWRITE, Action.PURGE

#: caller kind -> the callers of that kind (in ORG).
CALLERS: dict[str, UserCaller | TaskCaller] = {
    "admin": UserCaller("u", ORG, roles=frozenset({ADMIN_ROLE})),
    "producer": UserCaller("u", ORG, dags=frozenset({DAG})),
    "producer_with_read_role": UserCaller(
        "u", ORG, roles=frozenset({"analyst"}), dags=frozenset({DAG})
    ),
    "reader_role": UserCaller("u", ORG, roles=frozenset({"analyst", "other"})),
    "other_role": UserCaller("u", ORG, roles=frozenset({"other"})),
    "other_dag": UserCaller("u", ORG, roles=frozenset({"other"}), dags=frozenset({"dag-2"})),
    "plain_member": UserCaller("u", ORG),
    "non_member": UserCaller("u", ORG, member=False),
    "task_granted": TaskCaller(ORG, "t1", read=frozenset({NAME, "other"})),
    "task_other_grant": TaskCaller(ORG, "t1", read=frozenset({"other"})),
    "task_no_grant": TaskCaller(ORG, "t1"),
}

#: (caller kind, read_roles non-empty) -> the allowed actions. read_roles = {"analyst"}.
TABLE: dict[tuple[str, bool], set[Action]] = {
    ("admin", False): {R, W, P},
    ("admin", True): {R, W, P},
    ("producer", False): {R, W},
    ("producer", True): {R, W},
    ("producer_with_read_role", False): {R, W},
    ("producer_with_read_role", True): {R, W},
    ("reader_role", False): set(),
    ("reader_role", True): {R},
    ("other_role", False): set(),
    ("other_role", True): set(),
    ("other_dag", False): set(),
    ("other_dag", True): set(),
    ("plain_member", False): set(),
    ("plain_member", True): set(),
    ("non_member", False): set(),
    ("non_member", True): set(),
    ("task_granted", False): {R},
    ("task_granted", True): {R},
    ("task_other_grant", False): set(),
    ("task_other_grant", True): set(),
    ("task_no_grant", False): set(),
    ("task_no_grant", True): set(),
}


def acl(read_roles: bool, org: str = ORG) -> DatasetAcl:
    return DatasetAcl(
        org_id=org,
        name=NAME,
        dag_id=DAG,
        read_roles=frozenset({"analyst"}) if read_roles else frozenset(),
    )


def test_table_covers_every_caller_kind() -> None:
    assert set(TABLE) == set(itertools.product(CALLERS, (False, True)))


@pytest.mark.parametrize(
    ("kind", "read_roles", "action"), list(itertools.product(CALLERS, (False, True), Action))
)
def test_rule_table(kind: str, read_roles: bool, action: Action) -> None:
    caller, dataset = CALLERS[kind], acl(read_roles)
    expected = action in TABLE[(kind, read_roles)]
    assert allowed(caller, dataset, action) is expected
    if expected:
        assert check(caller, dataset, action) is None
    elif kind == "non_member":
        with pytest.raises(errors.NotFound) as nf:
            check(caller, dataset, action)
        assert nf.value.field == "dataset"
    else:
        with pytest.raises(errors.Forbidden) as exc:
            check(caller, dataset, action)
        assert action.value in exc.value.message


@pytest.mark.parametrize(
    ("kind", "read_roles", "action"), list(itertools.product(CALLERS, (False, True), Action))
)
def test_another_orgs_dataset_is_not_found(kind: str, read_roles: bool, action: Action) -> None:
    caller, dataset = CALLERS[kind], acl(read_roles, org="o2")
    assert allowed(caller, dataset, action) is False
    with pytest.raises(errors.NotFound):
        check(caller, dataset, action)


_ids = st.text("abcdef0123456789-", min_size=1, max_size=12)
_roles = st.frozensets(st.sampled_from([ADMIN_ROLE, "analyst", "viewer", "ops", "x"]))


@st.composite
def _cross_org(draw: st.DrawFn) -> tuple[UserCaller | TaskCaller, DatasetAcl]:
    org, other = draw(st.lists(_ids, min_size=2, max_size=2, unique=True))
    name = draw(st.text("abc_", min_size=1, max_size=8))
    dag = draw(_ids)
    dataset = DatasetAcl(org_id=org, name=name, dag_id=dag, read_roles=draw(_roles))
    # the caller holds, in its own org, every power that would grant access in the dataset's
    user = UserCaller(
        subject=draw(_ids),
        org_id=other,
        roles=draw(_roles) | {ADMIN_ROLE},
        dags=draw(st.frozensets(_ids)) | {dag},
        member=draw(st.booleans()),
    )
    task = TaskCaller(
        org_id=other,
        task_id=draw(_ids),
        read=draw(st.frozensets(st.text("abc_", max_size=8))) | {name},
    )
    caller = draw(st.sampled_from([user, task]))
    return caller, dataset


@given(_cross_org(), st.sampled_from(Action))
def test_a_caller_of_another_org_is_never_allowed_anything(
    case: tuple[UserCaller | TaskCaller, DatasetAcl],
    action: Action,
) -> None:
    caller, dataset = case
    assert allowed(caller, dataset, action) is False
    with pytest.raises(errors.NotFound):
        check(caller, dataset, action)


# --- task grants ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("grants", "read"),
    [
        ({"datasets": {"read": ["a", "b"]}}, {"a", "b"}),
        ({"datasets": {"read": ["a", 1, None, ["b"]]}}, {"a"}),
        ({"datasets": {"read": "a"}}, set()),  # a string is not a list of names
        ({"datasets": ["a"]}, set()),
        ({"datasets": {}}, set()),
        ({}, set()),
    ],
)
def test_task_grants(grants: dict[str, object], read: set[str]) -> None:
    task = TaskCaller.from_grants(ORG, "t1", grants)
    assert task.read == frozenset(read)
    assert (task.org_id, task.task_id) == (ORG, "t1")


def test_task_granted_by_token_reads_but_never_writes() -> None:
    task = TaskCaller.from_grants(ORG, "t1", {"datasets": {"read": [NAME]}})
    assert allowed(task, acl(False), R)
    assert not allowed(task, acl(False), W)
    assert not allowed(task, acl(False), P)


def test_roles_of_a_non_member_are_never_honoured() -> None:
    from trace_core.access import Action, DatasetAcl, UserCaller, allowed

    ds = DatasetAcl(org_id="o", name="d", dag_id="dag", read_roles=frozenset({"analyst"}))
    ghost = UserCaller(subject="x", org_id="o", roles=frozenset({"admin", "analyst"}), member=False)
    assert not any(allowed(ghost, ds, a) for a in Action)
    deployer = UserCaller(
        subject="y", org_id="o", roles=frozenset({"admin"}), dags=frozenset({"dag"}), member=False
    )
    assert allowed(deployer, ds, Action.READ) and allowed(deployer, ds, Action.OVERWRITE)
    assert not allowed(deployer, ds, Action.PURGE)  # the admin role does not count outside


# --- pins ------------------------------------------------------------------------------------


def test_pin_holders_of_users_and_tasks_never_collide() -> None:
    from trace_core.access import pin_holder

    task = TaskCaller(ORG, "t1")
    assert pin_holder(task) == "task/t1"
    assert pin_holder(UserCaller("task/t1", ORG)) != pin_holder(task)


@pytest.mark.parametrize(
    ("caller", "outcome"),
    [
        (UserCaller("ann", ORG), None),  # the holder
        (UserCaller("root", ORG, roles=frozenset({ADMIN_ROLE})), None),  # an org admin
        (UserCaller("bob", ORG), errors.Forbidden),  # a roleless member
        (UserCaller("bob", ORG, dags=frozenset({DAG})), errors.Forbidden),  # a producer
        (UserCaller("ann", ORG, member=False), errors.NotFound),  # left the org
        (UserCaller("eve", "o2", roles=frozenset({ADMIN_ROLE})), errors.NotFound),  # other org
        (UserCaller("ann", "o2"), errors.NotFound),  # the holder, through another org
        (UserCaller("x", ORG, roles=frozenset({ADMIN_ROLE}), member=False), errors.NotFound),
        (TaskCaller(ORG, "t1"), errors.Forbidden),  # a task is not the user holder
    ],
)
def test_only_the_holder_or_an_org_admin_releases_a_pin(
    caller: UserCaller | TaskCaller, outcome: type[errors.TraceError] | None
) -> None:
    from trace_core.access import PinAcl, check_release

    pin = PinAcl(org_id=ORG, holder="user/ann")
    if outcome is None:
        assert check_release(caller, pin) is None
    else:
        with pytest.raises(outcome):
            check_release(caller, pin)
