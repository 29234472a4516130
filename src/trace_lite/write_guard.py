"""Who may still write a key through a signed PUT URL: the attempt-scoped write guard.

Once an attempt's completion committed its outputs (or a buffer-publish committed a batch), the
producer must not change those bytes. The Lite object routes (``trace_lite.local_store``) ask
this guard before every signed PUT:

* only keys inside an attempt's staging prefix are writable by URL (a canonical dataset key,
  a bundle or any other key is refused);
* the attempt must still be running in that org: its completion ends the attempt in the same
  transaction that commits its outputs, so every signed PUT URL of the attempt dies with it;
* a key a buffer batch or a partition records as committed is refused even while the attempt
  runs (buffer-publish commits a batch mid-attempt).

A PUT that raced the commit (checked just before, written just after) cannot reach a reader
either: readers are handed promoted copies only, and promotion verifies the staged bytes
against the commit (``trace_core.commit.promotion_event``), marking a mismatch ``corrupt``.
"""

from __future__ import annotations

import uuid

import attrs
from psycopg_pool import AsyncConnectionPool

from trace_core import errors
from trace_core.object_keys import parse_staging_key
from trace_lite import sqlfile
from trace_lite.pg import fetch_as, transaction

Q = sqlfile.load("outputs.sql")


@attrs.frozen
class WritableRow:
    writable: bool


class StagingWriteGuard:
    """A ``trace_lite.local_store.WriteGuard`` backed by the state database."""

    def __init__(self, pool: AsyncConnectionPool) -> None:
        self.pool = pool

    async def __call__(self, key: str) -> None:
        """Returns None when ``key`` may be written now. Raises ``Forbidden`` otherwise,
        ``UnsafeKey`` for an unsafe key, ``Unavailable``."""
        where = parse_staging_key(key)
        if where is None:
            raise errors.Forbidden("signed PUT URLs write only inside a running attempt's staging")
        try:
            uuid.UUID(where.org_id)
            uuid.UUID(where.task_id)
        except ValueError:
            raise errors.Forbidden("signed URL: no such attempt") from None
        params = {
            "org_id": where.org_id,
            "task_id": where.task_id,
            "attempt": where.attempt,
            "key": key,
        }
        async with transaction(self.pool) as cur:
            (row,) = await fetch_as(cur, WritableRow, Q["staged_key_writable"], params)
        if not row.writable:
            raise errors.Forbidden(
                "signed URL: the attempt has finished or the object is committed; "
                "committed objects are immutable"
            )


__all__ = ["StagingWriteGuard"]
