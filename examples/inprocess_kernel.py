"""Drive the kernel in-process: create tasks, claim them as a trusted worker, complete them.

    python examples/inprocess_kernel.py            # uses the embedded cluster under ./.trace/pg
    TRACE_DATABASE_URL=postgresql://... python examples/inprocess_kernel.py

No HTTP and no queue: the Dispatcher runs in ``notify`` wake mode and this process claims with
``claim_next``, completing every attempt fenced on (task_id, attempt, lease_token).
"""

from __future__ import annotations

import asyncio

from trace_core import wire
from trace_core.testing import MemorySigner
from trace_lite.dispatcher import Dispatcher, open_pool
from trace_lite.embedded_pg import default_database_urls
from trace_lite.migrate import migrate


async def main() -> None:
    state_url, data_url = default_database_urls()
    migrate(state_url, data_url)
    pool = await open_pool(state_url)
    dispatcher = Dispatcher(pool, signer=MemorySigner(), wake_mode="notify")
    try:
        created = await dispatcher.create_tasks(
            [
                wire.CreateTaskRequest(operator="noop", org="example", payload={"i": i})
                for i in range(100)
            ]
        )
        done = 0
        while grants := await dispatcher.claim_next(50, worker_id="example"):
            results = await dispatcher.complete_many(
                [
                    wire.CompleteRequest(
                        task_id=g.task_id,
                        attempt=g.attempt,
                        lease_token=g.lease_token,
                        result={"i": g.payload["i"]},
                    )
                    for g in grants
                ]
            )
            done += sum(isinstance(r, wire.CompleteResponse) for r in results)
        print(f"created {len(created)}, completed {done}; counts: {await dispatcher.counts()}")
    finally:
        await pool.close()


if __name__ == "__main__":
    asyncio.run(main())
