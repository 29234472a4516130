"""heavy-blocks: keep the blocks whose gas use is over a threshold (a complete Trace UDF).

Reads the granted dataset ``blocks`` through the Query Service, emits the heavy ones to the
buffered dataset ``heavy_blocks`` (published after the handler returns, once across retries)
and an event committed with the completion. Run it locally with
``trace udf test examples/udf/python/heavy_blocks``.
"""

from __future__ import annotations

from trace_udf import Context, NonRetryableError


def handler(ctx: Context) -> dict[str, int]:
    threshold = ctx.payload.get("min_gas_used", 15_000_000)
    if not isinstance(threshold, int) or threshold < 0:
        raise NonRetryableError(f"min_gas_used must be a non-negative integer, not {threshold!r}")
    if "blocks" not in ctx.datasets:
        raise NonRetryableError("this job must declare blocks as an input")
    rows = ctx.query("SELECT number, gas_used FROM blocks ORDER BY number")
    heavy = [
        {"number": r["number"], "gas_used": r["gas_used"]}
        for r in rows
        if r["gas_used"] >= threshold
    ]
    ctx.emit_rows("heavy_blocks", heavy)
    ctx.emit_event("heavy_blocks.found", {"count": len(heavy)}, key="found")
    return {"scanned": len(rows), "heavy": len(heavy)}
