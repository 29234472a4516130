"""Postgres plumbing shared by the Dispatcher and the dataset store.

``transaction(pool)`` is the one boundary where psycopg errors become domain errors: a
transient failure (connection lost, statement or lock timeout, serialization failure, deadlock,
pool exhausted) is ``Unavailable``; a unique violation is ``Conflict``; a data or check
violation is ``ValidationFailed``. Nothing from psycopg reaches a kernel caller.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import psycopg
from psycopg.rows import tuple_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from trace_core import errors


@contextlib.asynccontextmanager
async def transaction(pool: AsyncConnectionPool) -> AsyncIterator[psycopg.AsyncCursor[Any]]:
    """One transaction; driver errors become domain errors at this boundary."""
    try:
        async with pool.connection() as conn, conn.transaction():
            async with conn.cursor(row_factory=tuple_row) as cur:
                yield cur
    except errors.TraceError:
        raise
    except (
        psycopg.OperationalError,
        psycopg.errors.QueryCanceled,
        psycopg.errors.LockNotAvailable,
        psycopg.errors.SerializationFailure,
        psycopg.errors.DeadlockDetected,
    ) as exc:
        raise errors.Unavailable(f"database unavailable: {type(exc).__name__}") from exc
    except psycopg.errors.UniqueViolation as exc:
        raise errors.Conflict("conflicting concurrent write") from exc
    except (psycopg.errors.DataError, psycopg.errors.CheckViolation) as exc:
        raise errors.ValidationFailed(f"invalid value: {exc.diag.message_primary}") from exc
    except PoolTimeout as exc:
        raise errors.Unavailable("database pool exhausted") from exc


__all__ = ["transaction"]
