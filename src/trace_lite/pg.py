"""Postgres plumbing shared by the Dispatcher and the dataset store.

``transaction(pool)`` is the one boundary where psycopg errors become domain errors: a
transient failure (connection lost, statement or lock timeout, serialization failure, deadlock,
pool exhausted) is ``Unavailable``; a unique violation is ``Conflict``; a data or check
violation, or a value over one of the database's limits (SQLSTATE class 54, e.g. JSON nested
past its stack depth) is ``ValidationFailed`` -- retrying cannot help a bad value, so it is
never ``Unavailable``. Messages never carry the backend's text (it is logged instead). Nothing
from psycopg reaches a kernel caller.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any, TypeVar

import psycopg
from psycopg.rows import class_row, tuple_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from trace_core import errors

log = logging.getLogger("trace.pg")

R = TypeVar("R")

#: SQLSTATE class of "program limit exceeded": a statement or value too big or too deep.
_LIMIT_CLASS = "54"


@contextlib.asynccontextmanager
async def transaction(pool: AsyncConnectionPool) -> AsyncIterator[psycopg.AsyncCursor[Any]]:
    """One transaction; driver errors become domain errors at this boundary."""
    try:
        async with pool.connection() as conn, conn.transaction():
            async with conn.cursor(row_factory=tuple_row) as cur:
                yield cur
    except errors.TraceError:
        raise
    except psycopg.Error as exc:
        mapped = _domain_error(exc)
        if mapped is None:
            raise
        raise mapped from exc
    except PoolTimeout as exc:
        raise errors.Unavailable("database pool exhausted") from exc


def _domain_error(exc: psycopg.Error) -> errors.TraceError | None:
    """The domain error for a driver error, ``None`` for one that is a bug (it propagates).
    The backend's own text is logged, never returned."""
    if (exc.sqlstate or "").startswith(_LIMIT_CLASS):
        log.info("value over a database limit", extra={"error": exc.diag.message_primary})
        return errors.ValidationFailed("a value exceeds the database's limits (too large or deep)")
    if isinstance(
        exc,
        psycopg.OperationalError
        | psycopg.errors.QueryCanceled
        | psycopg.errors.LockNotAvailable
        | psycopg.errors.SerializationFailure
        | psycopg.errors.DeadlockDetected,
    ):
        return errors.Unavailable(f"database unavailable: {type(exc).__name__}")
    if isinstance(exc, psycopg.errors.UniqueViolation):
        return errors.Conflict("conflicting concurrent write")
    if isinstance(exc, psycopg.errors.DataError | psycopg.errors.CheckViolation):
        log.info("value refused by the database", extra={"error": exc.diag.message_primary})
        return errors.ValidationFailed("a value cannot be stored")
    return None


async def fetch_as(
    cur: psycopg.AsyncCursor[Any], cls: type[R], query: str, params: Mapping[str, Any]
) -> list[R]:
    """Run ``query`` in ``cur``'s transaction and read its rows by name, as ``cls`` instances
    (each column a keyword argument of ``cls``)."""
    async with cur.connection.cursor(row_factory=class_row(cls)) as named:
        await named.execute(query, params)
        return await named.fetchall()


__all__ = ["fetch_as", "transaction"]
