"""The buffer forwarder's loop (``BufferForwarder.run``) is woken by the NOTIFY a buffer publish
sends at its commit (``tasks.sql`` ``insert_buffer_announcement``): with a poll far longer than
the test waits, a published batch is still forwarded at once."""

from __future__ import annotations

import asyncio

import pytest
import test_sink
from test_sink import Env, row

from pg_sql import sql
from trace_lite.buffer_forwarder import CHANNEL

env = test_sink.env  # the sink tests' fixture: a deployed buffered dataset and its forwarder


async def _until(what: str, check: object, limit_s: float = 10.0) -> None:
    assert callable(check)
    for _ in range(int(limit_s / 0.02)):
        if check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"not {what} within {limit_s} s")


@pytest.mark.parametrize("env", ["lite"], indirect=True)
async def test_the_forwarder_wakes_on_a_buffer_publish(env: Env) -> None:
    stop = asyncio.Event()
    loop = asyncio.create_task(env.forwarder.run(stop, every_s=600))
    try:
        await _until(
            "listening",
            lambda: (
                sql(
                    env.db_url,
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND query = %s",
                    (f'LISTEN "{CHANNEL}"',),
                )
                == [(1,)]
            ),
        )
        await asyncio.sleep(0.2)  # the loop's first drain found nothing and waits
        await env.publish(await env.task(), "b1", [row(1)])
        await _until(
            "forwarded (far below the 600 s poll)",
            lambda: (
                sql(env.db_url, "SELECT state FROM outbox WHERE topic = 'buffer:transfers'")
                == [("published",)]
            ),
        )
        messages = await (await env.dataset_queue()).receive(max_messages=10, visibility_timeout=30)
        assert len(messages) == 1
    finally:
        stop.set()
        await asyncio.wait_for(loop, 30)
