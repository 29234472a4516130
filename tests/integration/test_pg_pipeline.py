"""``pg.transaction(pipeline=True)`` on real Postgres: one transaction whatever happens in it,
driver errors mapped at the boundary, the connection handed back idle."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from psycopg.pq import TransactionStatus
from psycopg_pool import AsyncConnectionPool

from pg_sql import sql as pg_sql
from trace_core import errors
from trace_lite.pg import autocommit, open_pool, transaction


@pytest.fixture
async def pool(db_url: str) -> AsyncIterator[AsyncConnectionPool]:
    pool = await open_pool(db_url, min_size=1, max_size=1)  # every block gets the same connection
    pg_sql(db_url, "CREATE TABLE pipelined (n int PRIMARY KEY)")
    try:
        yield pool
    finally:
        await pool.close()


async def _rows(pool: AsyncConnectionPool) -> list[int]:
    async with autocommit(pool) as cur:
        await cur.execute("SELECT n FROM pipelined ORDER BY n")
        return [n for (n,) in await cur.fetchall()]


async def _idle(pool: AsyncConnectionPool) -> bool:
    async with pool.connection() as conn:
        return conn.info.transaction_status == TransactionStatus.IDLE


async def test_a_pipelined_transaction_commits_its_writes_once_it_ends(
    pool: AsyncConnectionPool,
) -> None:
    async with transaction(pool, pipeline=True) as cur:
        await cur.execute("INSERT INTO pipelined VALUES (1), (2) RETURNING n")
        assert await cur.fetchall() == [(1,), (2,)]
        await cur.execute("INSERT INTO pipelined VALUES (3)")  # sent with COMMIT, unread
    assert await _rows(pool) == [1, 2, 3] and await _idle(pool)


async def test_a_refusal_raised_inside_rolls_everything_back(pool: AsyncConnectionPool) -> None:
    with pytest.raises(errors.Forbidden):
        async with transaction(pool, pipeline=True) as cur:
            await cur.execute("INSERT INTO pipelined VALUES (1) RETURNING n")
            await cur.fetchall()
            raise errors.Forbidden("no")
    assert await _rows(pool) == [] and await _idle(pool)


async def test_a_failed_statement_is_mapped_and_rolls_back(pool: AsyncConnectionPool) -> None:
    # the duplicate fails on the server; the pipeline skips what follows it (the COMMIT)
    with pytest.raises(errors.Conflict):
        async with transaction(pool, pipeline=True) as cur:
            await cur.execute("INSERT INTO pipelined VALUES (1)")
            await cur.execute("INSERT INTO pipelined VALUES (1) RETURNING n")
            await cur.fetchall()
    assert await _rows(pool) == [] and await _idle(pool)
    # an unread failing statement fails the block as it ends
    with pytest.raises(errors.Conflict):
        async with transaction(pool, pipeline=True) as cur:
            await cur.execute("INSERT INTO pipelined VALUES (2), (2)")
    assert await _rows(pool) == [] and await _idle(pool)
    async with transaction(pool, pipeline=True) as cur:  # the connection is still good
        await cur.execute("INSERT INTO pipelined VALUES (4)")
    assert await _rows(pool) == [4]
