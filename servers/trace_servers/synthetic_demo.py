"""``trace demo --synthetic``: a task workload against a running Lite, and its summary.

``args.tasks`` tasks of the built-in ``demo`` operator (every ``args.fail_every``-th fails its
first attempt on purpose) are created through the Dispatcher's API, progress is read from the
state database until every task is terminal (or ``args.timeout`` passed), then a summary:
completed, failed, retried, events, buffer batches, lifecycle latency. The demo passes when
every task completed and at least one was retried.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any

import psycopg

from trace_lite.config import LiteSettings
from trace_sdk import DispatcherClient
from trace_servers.lite_processes import wait_ready


async def run_workload(settings: LiteSettings, state_url: str, args: argparse.Namespace) -> int:
    """Run the workload (module docstring) and print its summary; returns the exit code (0
    when the demo passed, 1 when it failed or timed out)."""
    await asyncio.to_thread(wait_ready, settings.dispatcher_url, 30.0)
    async with DispatcherClient(
        settings.dispatcher_url, platform_token=settings.platform_token
    ) as client:
        started = time.monotonic()
        run_tag = f"demo-{int(time.time())}"
        tasks: list[dict[str, Any]] = [
            {
                "operator": "demo",
                "org": "demo",
                "payload": {
                    "events": 2,
                    "rows": 5,
                    "fail_first": i % args.fail_every == 0,
                    "run": run_tag,
                },
            }
            for i in range(args.tasks)
        ]
        ids: list[str] = []
        for i in range(0, len(tasks), 1000):
            ids += [t["task_id"] for t in await client.create_tasks(tasks[i : i + 1000])]
        print(
            f"created {len(ids)} tasks ({sum(1 for t in tasks if t['payload']['fail_first'])} "
            f"fail their first attempt on purpose)"
        )
        terminal = ("completed", "failed", "canceled")
        tty = sys.stdout.isatty()
        last_print = 0.0
        async with await psycopg.AsyncConnection.connect(state_url, autocommit=True) as conn:
            while True:
                cur = await conn.execute(
                    "SELECT state, count(*) FROM tasks WHERE payload->>'run' = %s GROUP BY state",
                    (run_tag,),
                )
                counts: dict[str, int] = dict(await cur.fetchall())
                done = sum(counts.get(s, 0) for s in terminal)
                elapsed = time.monotonic() - started
                line = " ".join(f"{k}={v}" for k, v in sorted(counts.items()))
                text = f"[{elapsed:6.1f}s] {done}/{len(ids)} done  {line}"
                if tty:
                    print(f"\r{text}    ", end="", flush=True)
                elif time.monotonic() - last_print >= 2.0 or done >= len(ids):
                    print(text, flush=True)
                    last_print = time.monotonic()
                if done >= len(ids):
                    break
                if elapsed > args.timeout:
                    print("\ndemo timed out")
                    return 1
                await asyncio.sleep(0.5)
            if tty:
                print()
            cur = await conn.execute(
                """
                SELECT count(*) FILTER (WHERE state = 'completed'),
                       count(*) FILTER (WHERE state = 'failed'),
                       count(*) FILTER (WHERE attempt > 1),
                       percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - created_at)),
                       percentile_cont(0.95) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - created_at)),
                       (SELECT count(*) FROM task_events e JOIN tasks t2 USING (task_id)
                        WHERE t2.payload->>'run' = %(run)s),
                       (SELECT count(*) FROM buffer_batches b JOIN tasks t3 USING (task_id)
                        WHERE t3.payload->>'run' = %(run)s)
                FROM tasks WHERE payload->>'run' = %(run)s
                """,
                {"run": run_tag},
            )
            row = await cur.fetchone()
            assert row is not None
            completed, failed, retried, p50, p95, n_events, n_batches = row
        wall = time.monotonic() - started
        summary = {
            "tasks": len(ids),
            "completed": completed,
            "failed": failed,
            "retried": retried,
            "events": n_events,
            "buffer_batches": n_batches,
            "lifecycle_latency_p50_ms": round(float(p50) * 1000, 1),
            "lifecycle_latency_p95_ms": round(float(p95) * 1000, 1),
            "wall_s": round(wall, 2),
            "tasks_per_s": round(len(ids) / wall, 1),
        }
        print("summary:")
        for k, v in summary.items():
            print(f"  {k:28s} {v}")
        ok = completed == len(ids) and failed == 0 and retried >= 1
        print("demo OK" if ok else "demo FAILED")
        return 0 if ok else 1


__all__ = ["run_workload"]
