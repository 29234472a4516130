"""Which org a task belongs to, cached: org names to ids (created on first use) and task ids to
their org.

A task's org never changes and an org's id never changes, so both caches hold entries until
they are pushed out (the task cache is bounded, least recently used first). Checking a
capability token's ``org_id`` against its task (``Dispatcher.check_claims``) reads the task
cache, so a steady stream of task calls costs no extra query.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Final

import psycopg
from psycopg_pool import AsyncConnectionPool

from trace_lite.pg import transaction
from trace_lite.task_rows import OrgIdRow, Q, fetch

#: How many ``task_id -> org_id`` pairs are kept.
TASK_ORG_CACHE_SIZE: Final = 65_536


class TaskOrgs:
    """Org ids by org name and by task id, cached."""

    def __init__(self, pool: AsyncConnectionPool, *, capacity: int = TASK_ORG_CACHE_SIZE) -> None:
        self._pool = pool
        self._capacity = capacity
        self._by_name: dict[str, str] = {}
        self._by_task: OrderedDict[str, str] = OrderedDict()

    async def org_id(self, cur: psycopg.AsyncCursor[Any], name: str) -> str:
        """The id of org ``name``, created in ``cur``'s transaction if it does not exist."""
        org_id = self._by_name.get(name)
        if org_id is None:
            (row,) = await fetch(cur, OrgIdRow, Q["ensure_org"], {"name": name})
            org_id = self._by_name[name] = row.org_id
        return org_id

    def remember(self, task_id: str, org_id: str) -> None:
        """Record the org of a task read from its row."""
        self._by_task[task_id] = org_id
        self._by_task.move_to_end(task_id)
        if len(self._by_task) > self._capacity:
            self._by_task.popitem(last=False)

    async def of_task(self, task_id: str) -> str | None:
        """The org of ``task_id`` (a canonical UUID), ``None`` if there is no such task.
        Raises ``Unavailable``."""
        org_id = self._by_task.get(task_id)
        if org_id is not None:
            self._by_task.move_to_end(task_id)
            return org_id
        async with transaction(self._pool) as cur:
            rows = await fetch(cur, OrgIdRow, Q["task_org"], {"task_id": task_id})
        if not rows:
            return None
        self.remember(task_id, rows[0].org_id)
        return rows[0].org_id


__all__ = ["TASK_ORG_CACHE_SIZE", "TaskOrgs"]
