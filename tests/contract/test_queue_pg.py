"""The Queue conformance suite on the Lite Postgres queue, plus what only a real database shows:
receivers in separate OS processes, LISTEN/NOTIFY wake-ups, and lost connections.

``advance(seconds)`` for Postgres shifts this queue's ``visible_at`` back by ``seconds`` -- the
same as ``seconds`` of time passing for every visibility timeout and delay, since the queue
compares ``visible_at`` with the database's ``now()`` and nothing else.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from trace_core.errors import NotFound, Unavailable
from trace_core.testing.conformance.queue import MAX_RECEIVES, Advance, QueueConformance
from trace_lite.embedded_pg import EmbeddedPostgres
from trace_lite.migrate import migrate
from trace_lite.pg_queue import PgQueue

#: Test hook: make ``seconds`` pass for one queue (see the module docstring).
SHIFT_TIME = """
UPDATE queue_messages
SET visible_at = visible_at - make_interval(secs => %(seconds)s::double precision)
WHERE queue = %(queue)s
"""

TERMINATE_OTHERS = """
SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
WHERE datname = current_database() AND pid <> pg_backend_pid()
"""


@pytest.fixture
async def pool(db_url: str) -> AsyncIterator[AsyncConnectionPool]:
    pool = AsyncConnectionPool(
        db_url, min_size=1, max_size=10, kwargs={"autocommit": True}, open=False
    )
    await pool.open(wait=True)
    yield pool
    await pool.close()


@pytest.fixture
async def queue(pool: AsyncConnectionPool) -> AsyncIterator[PgQueue]:
    queue = PgQueue(pool, f"tasks-{uuid.uuid4().hex[:8]}", max_receives=MAX_RECEIVES)
    yield queue
    await queue.close()


@pytest.fixture
def advance(pool: AsyncConnectionPool, queue: PgQueue) -> Advance:
    async def advance(seconds: float) -> None:
        async with pool.connection() as conn:
            await conn.execute(SHIFT_TIME, {"seconds": seconds, "queue": queue.name})

    return advance


class TestPgQueue(QueueConformance):
    pass


async def test_queues_sharing_the_table_are_separate(pool: AsyncConnectionPool) -> None:
    async with PgQueue(pool, "a") as a, PgQueue(pool, "b") as b:
        await a.send([b"for-a"])
        assert await b.receive() == []
        [msg] = await a.receive()
        with pytest.raises(NotFound):
            await b.extend_visibility(msg.receipt, 10)
        await b.delete([msg.receipt])  # another queue's receipt deletes nothing
        assert await a.depth() == 1
        assert await b.depth() == 0


async def test_dead_letter_receipt_discards_it(queue: PgQueue, advance: Advance) -> None:
    await queue.send([b"poison"])
    for _ in range(MAX_RECEIVES):
        await queue.receive(visibility_timeout=1)
        await advance(2)
    assert await queue.receive() == []
    assert await queue.depth() == 0
    [dead] = await queue.dead_letters()
    await queue.delete([dead.receipt])
    assert await queue.dead_letters() == []
    assert await queue.redrive() == 0


async def test_conninfo_queue_owns_its_pool(db_url: str) -> None:
    queue = PgQueue(db_url, "owned")
    [sent] = await queue.send([b"x"])
    [msg] = await queue.receive(wait_seconds=1)
    assert msg.message_id == sent
    await queue.close()
    await queue.close()  # idempotent
    with pytest.raises(Unavailable):
        await queue.receive()


async def test_unreachable_database_is_unavailable(tmp_path: Path) -> None:
    queue = PgQueue(f"postgresql://postgres@/nodb?host={tmp_path}&connect_timeout=1", "q")
    queue._pool.timeout = 1.0  # fail fast
    try:
        with pytest.raises(Unavailable) as info:
            await queue.send([b"x"])
        assert isinstance(info.value.__cause__, psycopg.OperationalError)
    finally:
        await queue.close()


# -- LISTEN/NOTIFY ---------------------------------------------------------------------------


async def _long_poll_woken_by_notify(queue: PgQueue, sender: PgQueue) -> None:
    """A send's NOTIFY reaches ``queue``'s listener, which wakes the long poll waiting on it;
    the poll returns the message. ``queue``'s fallback re-poll is longer than the poll's wait,
    so the message could not arrive by polling before the wait ends. No timing: the check is
    that the notification arrived, counted by the listener."""
    receiving = asyncio.create_task(queue.receive(wait_seconds=20))
    for _ in range(100):  # the receive starts the listener
        if queue._listening.is_set():
            break
        await asyncio.sleep(0.05)
    before = queue.notifications
    await sender.send([b"wake"])
    for _ in range(300):
        if queue.notifications > before:
            break
        await asyncio.sleep(0.05)
    assert queue.notifications > before, "the send's NOTIFY never reached the listener"
    got = await receiving
    assert [m.body for m in got] == [b"wake"]
    await queue.delete([m.receipt for m in got])


async def test_notify_wakes_a_long_poll(pool: AsyncConnectionPool) -> None:
    name = f"wake-{uuid.uuid4().hex[:8]}"
    async with PgQueue(pool, name, poll_interval=60) as queue, PgQueue(pool, name) as sender:
        await _long_poll_woken_by_notify(queue, sender)


async def test_listener_and_pool_survive_lost_connections(pool: AsyncConnectionPool) -> None:
    name = f"lost-{uuid.uuid4().hex[:8]}"
    async with PgQueue(pool, name, poll_interval=60) as queue, PgQueue(pool, name) as sender:
        assert await queue.receive(wait_seconds=0.1) == []  # the listener is up
        async with await psycopg.AsyncConnection.connect(pool.conninfo, autocommit=True) as c:
            killed = (await (await c.execute(TERMINATE_OTHERS)).fetchone() or [0])[0]
        assert killed >= 2  # the pool's connections and the listener
        # the next call works: the dead pooled connections are dropped and the call retried
        await sender.send([b"after"])
        [msg] = await queue.receive()
        await queue.delete([msg.receipt])
        # and the listener reconnects: notifications wake long polls again
        await _long_poll_woken_by_notify(queue, sender)


@pytest.fixture
def private_cluster_dir() -> Iterator[Path]:
    # must be reachable by the server's OS user, so not under pytest's private tmp_path
    base = Path(tempfile.mkdtemp(prefix="trace-queue-restart-"))
    base.chmod(0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.mark.slow
async def test_survives_a_postgres_restart(private_cluster_dir: Path) -> None:
    # a private cluster: restarting the shared test cluster would disturb other sessions
    cluster = EmbeddedPostgres(private_cluster_dir / "pg", port=5400 + uuid.uuid4().int % 400)
    await asyncio.to_thread(cluster.start)
    try:
        url = await asyncio.to_thread(cluster.create_database, "restart")
        await asyncio.to_thread(migrate, url)
        async with PgQueue(url, "q", poll_interval=60) as queue, PgQueue(url, "q") as sender:
            await sender.send([b"before"])
            [msg] = await queue.receive(wait_seconds=1)
            await queue.delete([msg.receipt])
            await asyncio.to_thread(cluster.restart)
            await sender.send([b"after"])  # the next call after a restart works
            [msg] = await queue.receive()
            assert msg.body == b"after"
            await queue.delete([msg.receipt])
            await _long_poll_woken_by_notify(queue, sender)
            await asyncio.to_thread(cluster.stop, "immediate")
            with pytest.raises(Unavailable):
                await queue.receive()
    finally:
        await asyncio.to_thread(cluster.destroy)


# -- separate OS processes -------------------------------------------------------------------

RECEIVER = textwrap.dedent(
    """
    import asyncio, json, sys, time
    from trace_lite.pg_queue import PgQueue

    async def main(url, name, start_at):
        queue = PgQueue(url, name)
        await queue.depth()  # connect before the start line
        while time.time() < start_at:
            await asyncio.sleep(0.005)
        held = []
        while batch := await queue.receive(max_messages=3, visibility_timeout=300):
            held += [m.message_id for m in batch]
        await queue.close()
        print(json.dumps(held))

    asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3])))
    """
)


async def test_receivers_in_two_processes_never_share_a_message(db_url: str) -> None:
    name = f"procs-{uuid.uuid4().hex[:8]}"
    async with PgQueue(db_url, name) as queue:
        sent: list[str] = []
        for start in range(0, 600, 100):
            sent += await queue.send([f"task-{i}".encode() for i in range(start, start + 100)])
        start_at = time.time() + 1.5
        procs = [
            await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                RECEIVER,
                db_url,
                name,
                str(start_at),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            for _ in range(2)
        ]
        outputs = [await p.communicate() for p in procs]
        for proc, (_, err) in zip(procs, outputs, strict=True):
            assert proc.returncode == 0, err.decode()
        held = [json.loads(out) for out, _ in outputs]
        assert all(held), "both processes should have received messages"
        assert not set(held[0]) & set(held[1]), "two processes held the same message"
        assert sorted(held[0] + held[1]) == sorted(sent)
        assert len(held[0]) + len(held[1]) == len(sent)
