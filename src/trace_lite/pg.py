"""Postgres plumbing shared by the Dispatcher and the dataset store.

``open_pool`` opens a pool with the Dispatcher's session settings; ``fetch_as`` reads a query's
rows by name into a row class (``fetch_named`` into a ``typing.NamedTuple``, for hot paths);
``pg_array`` binds a big batch as one array literal.

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
import re
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import datetime
from typing import Any, Literal, TypeVar

import psycopg
from psycopg.rows import BaseRowFactory, RowMaker, class_row, tuple_row
from psycopg.types.string import TextLoader
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from trace_core import errors

log = logging.getLogger("trace.pg")

R = TypeVar("R")
NT = TypeVar("NT", bound=tuple[Any, ...])

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
    cur: psycopg.AsyncCursor[Any],
    cls: type[R],
    query: str,
    params: Mapping[str, Any],
    *,
    uuid_as_text: bool = False,
) -> list[R]:
    """Run ``query`` in ``cur``'s transaction and read its rows by name, as ``cls`` instances
    (each column a keyword argument of ``cls``). With ``uuid_as_text``, ``uuid`` columns come
    back as their canonical text instead of ``uuid.UUID`` (no parse, no ``str()`` per value)."""
    async with cur.connection.cursor(row_factory=class_row(cls)) as named:
        if uuid_as_text:
            named.adapters.register_loader("uuid", TextLoader)
        await named.execute(query, params)
        return await named.fetchall()


def named_row(cls: type[NT]) -> BaseRowFactory[NT]:
    """A row factory for ``cls``, a ``typing.NamedTuple``, matching columns to fields by name.

    The query's columns must be exactly ``cls``'s fields, in any order; that is checked once per
    result (``TypeError`` naming both otherwise), after which a row costs one tuple: no dict per
    row as with ``class_row``.
    """
    fields: tuple[str, ...] = tuple(getattr(cls, "_fields"))  # noqa: B009 - NamedTuple API

    def factory(cursor: Any) -> RowMaker[NT]:
        names = tuple(c.name for c in cursor.description or ())
        if names == fields:
            return lambda values: tuple.__new__(cls, values)
        if sorted(names) != sorted(fields):
            raise TypeError(f"{cls.__name__} has fields {fields}; the query returns {names}")
        order = [names.index(f) for f in fields]
        return lambda values: tuple.__new__(cls, [values[i] for i in order])

    return factory


async def fetch_named(
    cur: psycopg.AsyncCursor[Any], cls: type[NT], query: str, params: Mapping[str, Any]
) -> list[NT]:
    """Run ``query`` in ``cur``'s transaction and read its rows by name into ``cls``, a
    ``typing.NamedTuple`` (``named_row``); ``uuid`` columns come back as their canonical text."""
    async with cur.connection.cursor(row_factory=named_row(cls)) as named:
        named.adapters.register_loader("uuid", TextLoader)
        await named.execute(query, params)
        return await named.fetchall()


def pg_array(values: Sequence[str | int | datetime | None]) -> str:
    """A Postgres array literal for values that never need quoting: UUIDs, ints, enum words,
    hex digests, ISO timestamps (no spaces, commas, quotes, braces or backslashes).

    Big batches bind one string instead of a list psycopg would dump element by element; the
    SQL casts it (``%(ids)s::uuid[]``). Raises ``ValueError`` for a value that would need
    quoting, so a wrong use fails loudly instead of changing meaning.
    """
    items = [
        "NULL" if v is None else v.isoformat() if isinstance(v, datetime) else str(v)
        for v in values
    ]
    body = ",".join(items)
    # one scan of the whole literal: no element may hold quoting characters or a comma
    if _NEEDS_QUOTING.search(body) or body.count(",") != max(len(items) - 1, 0) or "" in items:
        raise ValueError("a value needs quoting in an array literal")
    return "{" + body + "}"


_NEEDS_QUOTING = re.compile(r'[\s"{}\\]')

PoolRole = Literal["api", "claim"]


def connection_kwargs(*, role: PoolRole = "api") -> dict[str, Any]:
    """Session settings for the Dispatcher's pool (``docs/standards/operations.md``, row
    "Postgres session"): the claim path's statements time out after 5 s, the others after 30 s."""
    statement_timeout = "5s" if role == "claim" else "30s"
    return {
        "options": (
            f"-c statement_timeout={statement_timeout} -c lock_timeout=5s "
            "-c idle_in_transaction_session_timeout=60s -c synchronous_commit=on"
        ),
        "autocommit": True,
    }


async def open_pool(
    url: str, *, min_size: int = 2, max_size: int = 10, role: PoolRole = "api"
) -> AsyncConnectionPool:
    """An open connection pool with the Dispatcher's session settings for ``role``."""
    pool = AsyncConnectionPool(
        url,
        min_size=min_size,
        max_size=max_size,
        kwargs=connection_kwargs(role=role),
        open=False,
        timeout=10.0,
    )
    await pool.open(wait=True, timeout=30.0)
    return pool


__all__ = [
    "connection_kwargs",
    "fetch_as",
    "fetch_named",
    "named_row",
    "open_pool",
    "pg_array",
    "transaction",
]
