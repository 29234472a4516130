"""``alert_detector`` and ``alert_route``: the operators that turn rows into alert deliveries.

Alert events travel as data (``docs/architecture/alerting.md``)::

    rows ──alert_detector──▶ alert_events (buffered dataset, the sink) ──rows_committed──▶
         ──alert_route──▶ alert_deliveries (the Delivery Service sends them)

* ``alert_detector`` (``make_alert_detector(inputs)``) runs one rule of
  ``trace_core.alert_rules`` (``config.rule``: ``transfer_threshold`` or ``field_above``, with
  that rule's fields; ``config.name`` names the detector, default the rule) over its input rows
  and publishes each alert event as a row of the buffered dataset ``config.dataset`` (default
  ``alert_events``, unique on ``alert_key``) in inline batches keyed ``alerts-<i>``. A retried
  attempt detects the same events and publishes the same batches under the same keys: the
  Dispatcher answers ``duplicate`` and the sink stores each alert key once per task, so a retry
  never raises an alert twice.
* ``alert_route`` (``make_alert_route(inputs, recorder)``) reads the alert events its input
  announces, matches ``config.routes`` (``trace_core.alert_rules.Route``: destinations by name,
  ``min_severity``, a label selector, ``max_delivery_age``) and asks ``recorder`` to record one
  delivery per (event, route, destination). Recording is keyed by
  ``trace_core.delivery.delivery_key`` and refused to an attempt that is no longer the task's
  running one, so retries and stale attempts record each delivery once. ``config.hang_first_s``
  (crash tests) makes attempt 1 sleep that long after recording, before it completes.

``config.block_times`` (a Parquet blocks dataset, e.g. ``monad_blocks``) gives each input row
of a range event a ``block_timestamp``: its block's ``timestamp`` in the same range (decoded
transfers carry block numbers, not times); the job declares that dataset as an input too (its
read grant) and skips that input's own events. Binary Parquet values are read as ``0x`` hex.

Input rows come from the task's input event (``payload.event``): its ``payload.rows`` when the
producer put the rows in the event; for a ``range`` event over a Parquet dataset (``{start,
end, dataset}``, e.g. ``cryo_ingest``'s blocks), the rows of that partition read through a
``trace_sdk.transforms.PartitionReader``; else ``inputs.rows(...)`` (the rows a
``rows_committed`` event announces, read by the platform). A manual run may pass
``payload.rows``.

Both need platform ports (like ``range_aggregator``): Lite implements them on Postgres
(``trace_lite.alert_inputs.PgAlertInputs``, ``trace_lite.delivery.DeliveryStore``), so they run
in a Lite worker built with them, not in the standalone ``trace worker``.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import pyarrow.parquet as pq

from trace_core import errors
from trace_core.alert_rules import (
    Planned,
    event_from_row,
    event_row,
    plan_deliveries,
    routes_from_config,
    rule_from_config,
)
from trace_sdk._worker import NonRetryableError, Operator, TaskContext
from trace_sdk.ranges import input_range
from trace_sdk.transforms import PartitionReader

#: Rows per published batch (the inline limit is 1,000 rows and 240 KiB).
BATCH_ROWS = 200


class AlertInputs(Protocol):
    """The rows a task's input event announces. Raises ``trace_core.errors.LeaseLost`` when
    ``attempt`` is not the task's running one, ``NotFound`` when the event names no dataset of
    the task's org, ``ValidationFailed`` for an event that announces no rows."""

    async def rows(
        self, task_id: str, attempt: int, event: Mapping[str, Any]
    ) -> list[dict[str, Any]]: ...


class DeliveryRecorder(Protocol):
    """Records planned deliveries for the task's org, each once (by its delivery key).
    Returns each delivery's state (``due`` or ``suppressed``) in order. Raises ``LeaseLost``
    (nothing recorded) when ``attempt`` is not the task's running one, ``NotFound`` naming a
    destination the org does not have."""

    async def record_planned(
        self, task_id: str, attempt: int, planned: Sequence[Planned]
    ) -> list[str]: ...


def parquet_rows(data: bytes) -> list[dict[str, Any]]:
    """The rows of a Parquet object, as dicts, binary values as ``0x`` hex (addresses and
    hashes as the rules read them)."""
    rows: list[dict[str, Any]] = pq.read_table(io.BytesIO(data)).to_pylist()
    return [
        {k: "0x" + v.hex() if isinstance(v, bytes) else v for k, v in row.items()} for row in rows
    ]


async def with_block_times(
    ctx: TaskContext, partitions: PartitionReader, rows: list[dict[str, Any]], blocks: str
) -> list[dict[str, Any]]:
    """``rows`` (of the task's input range) each with ``block_timestamp``: the ``timestamp``
    of its ``block_number`` in the same range's partition of the blocks dataset ``blocks``."""
    start, end, _ = input_range(ctx.payload)
    data = await partitions.read(ctx.task.task_id, ctx.attempt, blocks, start, end)
    times = {b["block_number"]: b["timestamp"] for b in await asyncio.to_thread(parquet_rows, data)}
    try:
        return [{**r, "block_timestamp": times[r["block_number"]]} for r in rows]
    except KeyError as exc:
        raise NonRetryableError(
            f"block {exc.args[0]} is not in {blocks} [{start}, {end})"
        ) from None


async def input_rows(
    ctx: TaskContext, inputs: AlertInputs | None, partitions: PartitionReader | None = None
) -> list[dict[str, Any]]:
    """The task's input rows (module docstring)."""
    payload = ctx.payload
    event = payload.get("event")
    if isinstance(event, Mapping):
        inner = event.get("payload")
        if isinstance(inner, Mapping) and isinstance(inner.get("rows"), list):
            return [dict(r) for r in inner["rows"] if isinstance(r, Mapping)]
        if event.get("type") == "range" and partitions is not None:
            start, end, dataset = input_range(payload)
            if dataset is None:
                raise NonRetryableError("the input range event names no dataset")
            data = await partitions.read(ctx.task.task_id, ctx.attempt, dataset, start, end)
            return await asyncio.to_thread(parquet_rows, data)
        if inputs is None:
            raise NonRetryableError("this worker cannot read the rows of an input event")
        try:
            return await inputs.rows(ctx.task.task_id, ctx.attempt, event)
        except (errors.ValidationFailed, errors.NotFound) as exc:
            raise NonRetryableError(f"input event: {exc.message}") from None
    rows = payload.get("rows")
    if isinstance(rows, list):
        return [dict(r) for r in rows if isinstance(r, Mapping)]
    raise NonRetryableError("no input rows: an input event, or payload.rows")


#: Payload fields that are not the rule's config (the DAG merges config, trigger payload and
#: the input event into one payload).
_NOT_RULE = frozenset(
    {"event", "rows", "name", "dataset", "block_times", "run_id", "scheduled_time"}
)


def _event_dataset(payload: Mapping[str, Any]) -> object:
    """The dataset the input event names, if any."""
    event = payload.get("event")
    inner = event.get("payload") if isinstance(event, Mapping) else None
    return inner.get("dataset") if isinstance(inner, Mapping) else None


def make_alert_detector(
    inputs: AlertInputs | None, partitions: PartitionReader | None = None
) -> Operator:
    """The ``alert_detector`` operator reading input rows through ``inputs`` (batches of
    buffered datasets) and ``partitions`` (Parquet partitions a ``range`` event announces)."""

    async def alert_detector(ctx: TaskContext) -> dict[str, Any] | None:
        """Runs config.rule over the input rows; publishes alert events to config.dataset."""
        payload = ctx.payload
        config = {k: v for k, v in payload.items() if k not in _NOT_RULE}
        name = str(payload.get("name") or payload.get("rule") or "detector")
        dataset = str(payload.get("dataset") or "alert_events")
        try:
            rule = rule_from_config(name, config)
        except errors.ValidationFailed as exc:
            raise NonRetryableError(f"{exc.field}: {exc.message}") from None
        blocks = payload.get("block_times")
        if isinstance(blocks, str) and _event_dataset(payload) == blocks:
            return {"skipped": f"the {blocks} event: its rows are read with the range's rows"}
        rows = await input_rows(ctx, inputs, partitions)
        if isinstance(blocks, str) and rows:
            if partitions is None:
                raise NonRetryableError("this worker cannot read block times")
            rows = await with_block_times(ctx, partitions, rows, blocks)
        try:
            events = rule.detect(rows)
        except errors.ValidationFailed as exc:
            raise NonRetryableError(f"{exc.field}: {exc.message}") from None
        out = [event_row(e) for e in events]
        for i in range(0, len(out), BATCH_ROWS):
            batch = out[i : i + BATCH_ROWS]
            await ctx.publish_buffer(dataset, batch, key=f"alerts-{i // BATCH_ROWS}", inline=True)
        return {"rows": len(rows), "alerts": len(out)}

    return alert_detector


def make_alert_route(inputs: AlertInputs | None, recorder: DeliveryRecorder) -> Operator:
    """The ``alert_route`` operator: reads alert events through ``inputs``, records
    deliveries through ``recorder``."""

    async def alert_route(ctx: TaskContext) -> dict[str, Any] | None:
        """Routes the input's alert events to config.routes' destinations."""
        try:
            routes = routes_from_config(ctx.payload.get("routes"))
        except errors.ValidationFailed as exc:
            raise NonRetryableError(f"{exc.field}: {exc.message}") from None
        rows = await input_rows(ctx, inputs)
        try:
            events = [event_from_row(r, f"rows[{i}]") for i, r in enumerate(rows)]
        except errors.ValidationFailed as exc:
            raise NonRetryableError(f"{exc.field}: {exc.message}") from None
        planned = plan_deliveries(events, routes)
        states = await _record(recorder, ctx, planned)
        hang = ctx.payload.get("hang_first_s")
        if ctx.attempt == 1 and isinstance(hang, int | float) and not isinstance(hang, bool):
            await asyncio.sleep(float(hang))  # crash tests: kill the worker after recording
        return {
            "events": len(events),
            "deliveries": len(planned),
            "due": states.count("due"),
            "suppressed": states.count("suppressed"),
        }

    return alert_route


async def _record(
    recorder: DeliveryRecorder, ctx: TaskContext, planned: Sequence[Planned]
) -> list[str]:
    """``recorder.record_planned`` for the context's attempt (nothing to record: no call)."""
    if not planned:
        return []
    return await recorder.record_planned(ctx.task.task_id, ctx.attempt, planned)


__all__ = [
    "BATCH_ROWS",
    "AlertInputs",
    "DeliveryRecorder",
    "input_rows",
    "make_alert_detector",
    "make_alert_route",
    "parquet_rows",
    "with_block_times",
]
