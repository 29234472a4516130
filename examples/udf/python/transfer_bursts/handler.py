"""transfer-bursts: a UDF detector -- an address sending many transfers raises an alert.

What a rule of the built-in ``alert_detector`` cannot say (it looks at one row at a time):
this handler groups the input transfers by sender, and each sender with at least
``min_count`` of them becomes one alert event, emitted to the buffered, multi-writer
``alert_events`` dataset. The DAG's ``alert_route`` job routes it to destinations and the
Delivery Service sends it (``dag.yaml`` here; ``docs/architecture/alerting.md``, "UDF
detectors"). The event's key is the detector's name, the sender and its first transfer in the
input, and its time is that sender's latest transfer's block timestamp: a retry writes the same
event, stored once. Run it locally with ``trace udf test examples/udf/python/transfer_bursts``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from trace_udf import Context, NonRetryableError
from trace_udf.alerts import alert_event

DETECTOR = "transfer_bursts"


def _rows(ctx: Context) -> list[dict[str, Any]]:
    """The transfers: the trigger's ``rows``, else the granted ``transfers`` dataset."""
    rows = ctx.payload.get("rows")
    if isinstance(rows, list):
        return [r for r in rows if isinstance(r, dict)]
    if "transfers" in ctx.datasets:
        return ctx.query(
            "SELECT transaction_hash, log_index, from_address, block_number, block_timestamp "
            "FROM transfers ORDER BY block_number, log_index"
        )
    raise NonRetryableError("no input: a trigger payload with rows, or the transfers dataset")


def _when(value: object) -> datetime:
    """A block timestamp (ISO 8601 with an offset) as a datetime."""
    return datetime.fromisoformat(str(value).replace("Z", "+00:00"))


def handler(ctx: Context) -> dict[str, int]:
    min_count = ctx.payload.get("min_count", 3)
    if not isinstance(min_count, int) or min_count < 1:
        raise NonRetryableError(f"min_count must be a positive integer, not {min_count!r}")
    severity = str(ctx.payload.get("severity", "warning"))
    labels = ctx.payload.get("labels") or {}
    rows = _rows(ctx)
    by_sender: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_sender.setdefault(str(row["from_address"]).lower(), []).append(row)
    events = []
    for sender, sent in sorted(by_sender.items()):
        if len(sent) < min_count:
            continue
        first = sent[0]
        events.append(
            alert_event(
                DETECTOR,
                [sender, first["transaction_hash"], first["log_index"]],
                event_time=max(_when(r["block_timestamp"]) for r in sent),
                summary=f"{len(sent)} transfers from {sender}",
                severity=severity,
                labels=labels,
                details={"from_address": sender, "transfers": len(sent)},
            )
        )
    if events:
        ctx.emit_rows("alert_events", events, key="bursts")
    return {"rows": len(rows), "alerts": len(events)}
