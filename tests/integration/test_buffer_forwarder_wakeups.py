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
from waiting import wait_until

env = test_sink.env  # the sink tests' fixture: a deployed buffered dataset and its forwarder


@pytest.mark.parametrize("env", ["lite"], indirect=True)
async def test_the_forwarder_wakes_on_a_buffer_publish(env: Env) -> None:
    def listening() -> bool:
        return sql(
            env.db_url,
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND query = %s",
            (f'LISTEN "{CHANNEL}"',),
        ) == [(1,)]

    def forwarded() -> bool:
        return sql(env.db_url, "SELECT state FROM outbox WHERE topic = 'buffer:transfers'") == [
            ("published",)
        ]

    stop = asyncio.Event()
    loop = asyncio.create_task(env.forwarder.run(stop, every_s=600))
    try:
        await wait_until(listening, "listening")
        await asyncio.sleep(0.2)  # the loop's first drain found nothing and waits
        await env.publish(await env.task(), "b1", [row(1)])
        await wait_until(forwarded, "forwarded (far below the 600 s poll)")
        messages = await (await env.dataset_queue()).receive(max_messages=10, visibility_timeout=30)
        assert len(messages) == 1
    finally:
        stop.set()
        await asyncio.wait_for(loop, 30)
