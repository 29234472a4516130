"""The ``/metrics`` endpoint of Trace's background processes (delivery sender, sinks).

Each process keeps its gauges in its own Prometheus registry and refreshes them from the
state database when scraped. A refresh that fails with a Trace error (the database is away)
still answers, with the values last known: a scrape never takes the process down. The
endpoint listens on 127.0.0.1 only.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest

from trace_core import errors

#: The Prometheus text exposition format.
CONTENT_TYPE = "text/plain; version=0.0.4"


async def serve_metrics(
    registry: CollectorRegistry, refresh: Callable[[], Awaitable[None]], port: int
) -> web.AppRunner:
    """Serve ``registry`` at ``http://127.0.0.1:<port>/metrics``, calling ``refresh`` before
    each answer. Returns the started runner; the caller cleans it up."""

    async def handler(_request: web.Request) -> web.Response:
        try:
            await refresh()
        except errors.TraceError:
            pass  # serve what is known
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE})

    app = web.Application()
    app.add_routes([web.get("/metrics", handler)])
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner
