"""Peers on the same PostgreSQL: pgqueuer, procrastinate, and a raw SKIP LOCKED loop.

Each does the same no-op work under the same protocol as Trace (``bench.trace_inproc``):
workers start idle, a producer enqueues ``n`` jobs in batches, throughput is ``n`` over the time
from the first enqueue to the moment no job is left unfinished; latency is from an enqueue
returning to the job's handler starting, for jobs enqueued one at a time into idle workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import timedelta
from typing import Any

import psycopg

from bench.common import batches, count, wait_until
from bench.procs import Children, wait_flag

# --- pgqueuer --------------------------------------------------------------------------------


def _pgq_manager(conn: psycopg.AsyncConnection[Any], on_job: Any = None) -> Any:
    from pgqueuer import PsycopgDriver, Queries, QueueManager

    qm = QueueManager(Queries(PsycopgDriver(conn)))

    @qm.entrypoint("noop")
    async def noop(job: Any) -> None:
        if on_job is not None:
            on_job(job)

    return qm


async def pgqueuer_install(url: str) -> None:
    from pgqueuer import PsycopgDriver, Queries

    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await Queries(PsycopgDriver(conn)).install()


async def _pgq_worker(url: str, batch: int, ready: Any, stop: Any) -> None:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        qm = _pgq_manager(conn)
        run = asyncio.create_task(qm.run(batch_size=batch, dequeue_timeout=timedelta(seconds=1)))
        await asyncio.sleep(0.3)
        ready.set()
        await wait_flag(stop)
        qm.shutdown.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(run, 10)


async def _pgq_enqueue(conn: psycopg.AsyncConnection[Any], n: int, batch: int) -> None:
    from pgqueuer import PsycopgDriver, Queries

    q = Queries(PsycopgDriver(conn))
    for size in batches(n, batch):
        await q.enqueue(["noop"] * size, [None] * size, [0] * size)


async def pgqueuer_throughput(
    url: str, n: int, *, processes: int = 2, batch: int = 500, enqueue_batch: int = 1000
) -> float:
    left = await count(url, "SELECT count(*) FROM pgqueuer")
    try:
        async with (
            Children(processes, _pgq_worker, url, batch),
            await psycopg.AsyncConnection.connect(url, autocommit=True) as conn,
        ):
            started = time.monotonic()
            await _pgq_enqueue(conn, n, enqueue_batch)
            finished = await wait_until(lambda: _is_zero(left), limit_s=300)
        return n / (finished - started)
    finally:
        await left.conn.close()  # type: ignore[attr-defined]


async def pgqueuer_latency(url: str, m: int, *, gap_s: float = 0.005) -> list[float]:
    from pgqueuer import PsycopgDriver, Queries

    started: dict[int, float] = {}
    async with (
        await psycopg.AsyncConnection.connect(url, autocommit=True) as wconn,
        await psycopg.AsyncConnection.connect(url, autocommit=True) as pconn,
    ):
        qm = _pgq_manager(wconn, lambda job: started.__setitem__(int(job.id), time.time()))
        run = asyncio.create_task(qm.run(batch_size=10, dequeue_timeout=timedelta(seconds=1)))
        await asyncio.sleep(0.5)
        q = Queries(PsycopgDriver(pconn))
        enqueued: dict[int, float] = {}
        for _ in range(m):
            (jid,) = await q.enqueue(["noop"], [None], [0])
            enqueued[int(jid)] = time.time()
            await asyncio.sleep(gap_s)
        await wait_until(lambda: _true(len(started) >= m), limit_s=30)
        qm.shutdown.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(run, 10)
    return [(started[j] - enqueued[j]) * 1000 for j in enqueued]


# --- procrastinate ---------------------------------------------------------------------------


def _proc_app(url: str, on_job: Any = None) -> Any:
    import procrastinate

    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=url))

    @app.task(name="noop", pass_context=True)
    async def noop(context: Any, k: int = 0) -> None:
        if on_job is not None:
            on_job(k)

    return app


async def procrastinate_install(url: str) -> None:
    app = _proc_app(url)
    async with app.open_async():
        await app.schema_manager.apply_schema_async()


async def _proc_worker(url: str, concurrency: int, ready: Any, stop: Any) -> None:
    import logging

    logging.getLogger("procrastinate").setLevel(logging.ERROR)
    app = _proc_app(url)
    async with app.open_async():
        run = asyncio.create_task(
            app.run_worker_async(
                concurrency=concurrency,
                wait=True,
                install_signal_handlers=False,
                fetch_job_polling_interval=1.0,
            )
        )
        await asyncio.sleep(0.5)
        ready.set()
        await wait_flag(stop)
        run.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(run, 10)


async def procrastinate_throughput(
    url: str, n: int, *, processes: int = 2, concurrency: int = 10, enqueue_batch: int = 1000
) -> float:
    left = await count(
        url, "SELECT count(*) FROM procrastinate_jobs WHERE status IN ('todo', 'doing')"
    )
    app = _proc_app(url)
    try:
        async with Children(processes, _proc_worker, url, concurrency), app.open_async():
            task = app.tasks["noop"]
            started = time.monotonic()
            for size in batches(n, enqueue_batch):
                await task.batch_defer_async(*([{}] * size))
            finished = await wait_until(lambda: _is_zero(left), limit_s=300)
        return n / (finished - started)
    finally:
        await left.conn.close()  # type: ignore[attr-defined]


async def procrastinate_latency(url: str, m: int, *, gap_s: float = 0.005) -> list[float]:
    started: dict[int, float] = {}
    app = _proc_app(url, lambda k: started.__setitem__(k, time.time()))
    enqueued: dict[int, float] = {}
    async with app.open_async():
        run = asyncio.create_task(
            app.run_worker_async(concurrency=4, wait=True, install_signal_handlers=False)
        )
        await asyncio.sleep(0.5)
        task = app.tasks["noop"]
        for k in range(m):
            await task.defer_async(k=k)
            enqueued[k] = time.time()
            await asyncio.sleep(gap_s)
        await wait_until(lambda: _true(len(started) >= m), limit_s=60)
        run.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(run, 10)
    return [(started[k] - enqueued[k]) * 1000 for k in enqueued]


# --- raw SKIP LOCKED loop --------------------------------------------------------------------

RAW_SCHEMA = """
CREATE TABLE raw_jobs (id bigserial PRIMARY KEY, state text NOT NULL DEFAULT 'queued',
                       payload jsonb NOT NULL DEFAULT '{}', created_at timestamptz DEFAULT now(),
                       finished_at timestamptz);
CREATE INDEX raw_jobs_queued ON raw_jobs (id) WHERE state = 'queued';
"""

RAW_CLAIM = """
UPDATE raw_jobs SET state = 'done', finished_at = now()
WHERE id = (SELECT id FROM raw_jobs WHERE state = 'queued' ORDER BY id
            FOR UPDATE SKIP LOCKED LIMIT 1)
RETURNING id
"""


async def raw_install(url: str) -> None:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute(RAW_SCHEMA)


async def _raw_loop(url: str, stop: Any) -> None:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        while not stop.is_set():
            # One job per statement, one commit per job (autocommit): the naive queue loop.
            cur = await conn.execute(RAW_CLAIM, prepare=True)
            if await cur.fetchone() is None:
                await asyncio.sleep(0.005)


async def _raw_worker(url: str, loops: int, ready: Any, stop: Any) -> None:
    ready.set()
    await asyncio.gather(*(_raw_loop(url, stop) for _ in range(loops)))


async def raw_throughput(
    url: str, n: int, *, processes: int = 1, loops: int = 1, enqueue_batch: int = 1000
) -> float:
    left = await count(url, "SELECT count(*) FROM raw_jobs WHERE state = 'queued'")
    try:
        async with (
            Children(processes, _raw_worker, url, loops),
            await psycopg.AsyncConnection.connect(url, autocommit=True) as conn,
        ):
            started = time.monotonic()
            for size in batches(n, enqueue_batch):
                await conn.execute(
                    "INSERT INTO raw_jobs (payload) SELECT '{}' FROM generate_series(1, %s)", [size]
                )
            finished = await wait_until(lambda: _is_zero(left), limit_s=300)
        return n / (finished - started)
    finally:
        await left.conn.close()  # type: ignore[attr-defined]


async def _is_zero(probe: Any) -> bool:
    return await probe() == 0


async def _true(x: bool) -> bool:
    return x
