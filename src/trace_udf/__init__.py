"""``trace_udf``: write a Trace UDF in Python.

Public face::

    from trace_udf import Context, Invocation, NonRetryableError, TaskApiError

    def handler(ctx: Context) -> dict | None:
        rows = ctx.query("SELECT number, gas_used FROM blocks")
        ctx.emit_rows("heavy_blocks", [r for r in rows if r["gas_used"] > 10_000_000])
        ctx.emit_event("heavy.done", {"n": len(rows)}, key="done")
        return {"seen": len(rows)}

- ``Context``: the invocation (``ctx.event``), the work payload (``ctx.payload``), the granted
  datasets (``ctx.datasets``), ``query``, ``emit_rows``, ``emit_event``, ``heartbeat``.
- ``trace_udf.runtime``: the Lambda Runtime API loop the runner (or Lambda) starts.
- ``trace_udf.testing.run(handler, payload, datasets=...)``: run a handler locally.

Standard library only, so ``trace udf build`` vendors it into every Python bundle. The
contract is ``docs/architecture/udf.md``.
"""

from trace_udf._api import TaskApi, TaskApiError
from trace_udf._context import Context, Invocation, NonRetryableError

__all__ = ["Context", "Invocation", "NonRetryableError", "TaskApi", "TaskApiError"]
