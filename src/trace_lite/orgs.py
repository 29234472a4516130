"""Orgs, their members and DAG membership on Postgres: who a user is inside one org.

Roles and DAG grants live in ``org_members`` / ``dag_members``, never in a token: every user
request reads the caller's membership here (``user_caller``) and ``trace_core.access`` decides.

Invariants kept here:

* a non-member learns nothing about an org: ``user_caller`` answers an org the subject neither
  belongs to nor holds a DAG grant in exactly as it answers an org that does not exist
  (``NotFound("no such org")``);
* the member operations are for org admins (``caller=None`` is the platform itself: tests, the
  CLI, DAG deploy).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import attrs
from psycopg_pool import AsyncConnectionPool

from trace_core import errors
from trace_core.access import UserCaller
from trace_lite import sqlfile
from trace_lite.pg import fetch_as, transaction

Q = sqlfile.load("orgs.sql")
_R = TypeVar("_R")


@attrs.frozen
class OrgRow:
    org_id: str


@attrs.frozen
class MembershipRow:
    #: The subject's roles in the org (empty for a non-member).
    roles: list[str]
    #: DAG ids of the org the subject deploys or triggers.
    dags: list[str]
    #: Whether the subject is in ``org_members`` at all.
    member: bool


@attrs.frozen
class MemberRow:
    subject: str
    roles: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {"subject": self.subject, "roles": list(self.roles)}


@attrs.frozen
class DagRow:
    dag_id: str


def first(rows: Sequence[_R]) -> _R | None:
    """The first row, or None."""
    return rows[0] if rows else None


class Orgs:
    """Org ids (cached: an org is never renamed or deleted), members and DAG members."""

    def __init__(self, pool: AsyncConnectionPool) -> None:
        self.pool = pool
        self._ids: dict[str, str] = {}

    async def org_id(self, name: str, *, create: bool = False) -> str:
        """The id of org ``name`` (created if missing when ``create``). Raises ``NotFound``."""
        cached = self._ids.get(name)
        if cached:
            return cached
        async with transaction(self.pool) as cur:
            query = Q["ensure_org" if create else "org_by_name"]
            row = first(await fetch_as(cur, OrgRow, query, {"name": name}))
        if row is None:
            raise errors.NotFound("no such org", field="org")
        self._ids[name] = row.org_id
        return row.org_id

    async def user_caller(self, org: str, subject: str) -> UserCaller:
        """The user's membership in ``org``, read from Postgres (never from the token).

        Raises ``NotFound`` ("no such org") for an unknown org *and* for an org the subject
        neither belongs to nor holds a DAG grant in: a non-member cannot tell the two apart."""
        org_id = await self.org_id(org)
        async with transaction(self.pool) as cur:
            (m,) = await fetch_as(
                cur, MembershipRow, Q["member"], {"org_id": org_id, "subject": subject}
            )
        if not m.member and not m.dags:
            raise errors.NotFound("no such org", field="org")
        return UserCaller(
            subject=subject,
            org_id=org_id,
            roles=frozenset(m.roles),
            dags=frozenset(m.dags),
            member=m.member,
        )

    @staticmethod
    def require_admin(caller: UserCaller | None, org_id: str) -> None:
        """Returns None for the platform (``None``) and admins of ``org_id``. Raises
        ``NotFound`` for a caller outside the org, ``Forbidden`` for a non-admin member."""
        if caller is None:
            return
        if caller.org_id != org_id or not (caller.member or caller.dags):
            raise errors.NotFound("no such org", field="org")
        if not caller.is_admin:
            raise errors.Forbidden("org admins only")

    async def set_member(
        self, caller: UserCaller | None, org: str, subject: str, roles: Sequence[str]
    ) -> dict[str, Any]:
        """Add or update a member's roles (org admins; the platform creates the org if
        missing). Returns ``{"subject", "roles"}``. Raises ``Forbidden``, ``NotFound``."""
        org_id = await self.org_id(org, create=caller is None)
        self.require_admin(caller, org_id)
        params = {"org_id": org_id, "subject": subject, "roles": sorted(set(roles))}
        async with transaction(self.pool) as cur:
            (row,) = await fetch_as(cur, MemberRow, Q["upsert_member"], params)
        return row.to_dict()

    async def remove_member(self, caller: UserCaller | None, org: str, subject: str) -> None:
        """Remove a member and their DAG memberships in the org (org admins). Raises
        ``Forbidden``, ``NotFound``."""
        org_id = await self.org_id(org)
        self.require_admin(caller, org_id)
        async with transaction(self.pool) as cur:
            params = {"org_id": org_id, "subject": subject}
            if not await fetch_as(cur, MemberRow, Q["delete_member"], params):
                raise errors.NotFound("no such member", field="subject")

    async def list_members(self, caller: UserCaller | None, org: str) -> list[dict[str, Any]]:
        """The org's members with their roles (org admins). Raises ``Forbidden``,
        ``NotFound``."""
        org_id = await self.org_id(org)
        self.require_admin(caller, org_id)
        async with transaction(self.pool) as cur:
            rows = await fetch_as(cur, MemberRow, Q["list_members"], {"org_id": org_id})
        return [r.to_dict() for r in rows]

    async def ensure_dag(
        self, org: str, name: str, *, deployers: Sequence[str] = (), triggerers: Sequence[str] = ()
    ) -> str:
        """Create DAG ``name`` in ``org`` if missing (platform call; YAML deploy comes later)
        and add its deployers and triggerers. Returns its id."""
        org_id = await self.org_id(org, create=True)
        async with transaction(self.pool) as cur:
            (dag,) = await fetch_as(cur, DagRow, Q["ensure_dag"], {"org_id": org_id, "name": name})
            for relation, subjects in (("deployer", deployers), ("triggerer", triggerers)):
                for s in subjects:
                    await cur.execute(
                        Q["add_dag_member"],
                        {"dag_id": dag.dag_id, "subject": s, "relation": relation},
                    )
        return dag.dag_id


__all__ = ["Orgs", "first"]
