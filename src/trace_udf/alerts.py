"""Alert events from a UDF: a handler that detects something writes ``alert_events`` rows.

A UDF detector emits each would-have-alerted fact as one row of the buffered, multi-writer
``alert_events`` dataset, the same row the built-in ``alert_detector`` writes, so the DAG's
``alert_route`` job routes it like any other::

    from trace_udf import Context
    from trace_udf.alerts import alert_event

    def handler(ctx: Context) -> None:
        ctx.emit_rows("alert_events", [
            alert_event("bursts", [sender, first_block], event_time=block_time,
                        summary=f"{n} transfers from {sender}", severity="error",
                        labels={"team": "treasury"}, details={"from": sender, "count": n}),
        ])

``alert_key`` is the built-in detectors' key (``trace_core.alert_rules.alert_key``: SHA-256 of
the detector's name and the row's key values, length-prefixed): deterministic, so a retried
attempt writes the same keys and the dataset (unique on ``alert_key``) stores each event once.
``event_time`` is the row's own time (a block timestamp), never the clock. The job declares the
output as in ``examples/udf/python/transfer_bursts/dag.yaml`` (``multi_writer: true``, unique on
``alert_key``, the seven columns of ``ALERT_EVENTS_COLUMNS``).

Standard library only (vendored into every Python bundle).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

#: The severities a route's ``min_severity`` orders, lowest first.
SEVERITIES = ("info", "warning", "error", "critical")
#: The columns of ``alert_events`` (its schema in a DAG: these names and types).
ALERT_EVENTS_COLUMNS = {
    "alert_key": "string",
    "detector": "string",
    "event_time": "timestamp",
    "severity": "string",
    "summary": "string",
    "labels": "json",
    "details": "json",
}


def alert_key(detector: str, key_values: Sequence[object]) -> str:
    """SHA-256 of the detector's name and the row's key values, length-prefixed (the
    platform's ``alert_key``)."""
    digest = hashlib.sha256(b"trace.alert.v1")
    for part in (detector, *(str(v) for v in key_values)):
        data = part.encode()
        digest.update(len(data).to_bytes(4, "big") + data)
    return digest.hexdigest()


def _time(value: datetime | str) -> str:
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"event_time {value!r} is not an ISO 8601 time") from None
    if not isinstance(value, datetime) or value.tzinfo is None:
        raise ValueError("event_time must be a datetime with a time zone")
    return value.astimezone(UTC).isoformat()


def alert_event(
    detector: str,
    key_values: Sequence[object],
    *,
    event_time: datetime | str,
    summary: str,
    severity: str = "warning",
    labels: Mapping[str, str] | None = None,
    details: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One ``alert_events`` row. ``key_values`` identify the fact (e.g. a transaction hash and
    log index); ``event_time`` is its contextual time, timezone-aware (or ISO 8601 with an
    offset). Raises ``ValueError`` for an empty detector name or key, an unknown severity, a
    naive time or a label that is not a string."""
    if not detector:
        raise ValueError("detector must be a non-empty name")
    if not key_values:
        raise ValueError("key_values must identify the event")
    if severity not in SEVERITIES:
        raise ValueError(f"severity is one of {', '.join(SEVERITIES)}, not {severity!r}")
    labels = dict(labels or {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise ValueError("labels map names to strings")
    return {
        "alert_key": alert_key(detector, key_values),
        "detector": detector,
        "event_time": _time(event_time),
        "severity": severity,
        "summary": summary,
        "labels": labels,
        "details": dict(details or {}),
    }


__all__ = ["ALERT_EVENTS_COLUMNS", "SEVERITIES", "alert_event", "alert_key"]
