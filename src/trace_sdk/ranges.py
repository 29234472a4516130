"""``range_splitter`` and ``range_aggregator``: block-range windows (``trace_core.ranges``).

Both read one input range ``[start, end)``: the payload's ``start``/``end``, or the upstream
range event's ``payload`` under ``event`` (what the DAG fan-out hands a consuming task). Config:
``blocks`` (the window size, required) and, for the aggregator, ``origin`` (where coverage
begins: default 0, a multiple of ``blocks``). Windows are aligned to multiples of ``blocks``.
Each window is announced with the completion as an event: key ``window:{start}_{end}``, type
``range``, payload ``{start, end, partition_key}``. Neither writes a dataset (v1).

* ``range_splitter`` (stateless, in ``BUILTIN_OPERATORS``): cuts the input at window
  boundaries, one event per piece (a 25,000-block range with ``blocks: 10000`` from 0 gives
  0_10000, 10000_20000, 20000_25000).
* ``range_aggregator`` (``make_range_aggregator(store)``: it needs durable state, kept by the
  platform per (org, job, input dataset) behind ``StateStore``; Lite:
  ``trace_lite.operator_state.PgOperatorState``): folds ordered inputs and announces each window
  once all of it is covered. v1 assumes ordered inputs; otherwise (``trace_core.ranges``): a
  range already covered comes again when its data was committed again (a reorged range
  re-extracted with ``replace``, or a retried task): the windows already announced that hold
  part of it are announced again (the same keys, so their downstream tasks rerun and replace
  their partitions), once per committing task (the event's ``producer_task_id``); a range
  after a gap fails the task retryably ("waiting for ..."), so it waits through its retries
  for the missing ranges and fails visibly when they never come; a partial overlap fails the
  task for good.
"""

from __future__ import annotations

from typing import Any, Protocol

from trace_core import ranges
from trace_sdk._worker import NonRetryableError, Operator, TaskContext


class StateStore(Protocol):
    """Durable operator state of the job a task runs for; only its running attempt may use
    it. ``save`` is a compare-and-swap over the version ``load`` returned (0: none yet) and
    raises ``trace_core.errors.Conflict`` when another writer moved it first."""

    async def load(
        self, task_id: str, attempt: int, input_dataset: str | None = None
    ) -> tuple[dict[str, Any] | None, int]: ...

    async def save(
        self,
        task_id: str,
        attempt: int,
        state: dict[str, Any],
        version: int,
        input_dataset: str | None = None,
    ) -> int: ...


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def input_range(payload: dict[str, Any]) -> tuple[int, int, str | None]:
    """``(start, end, input dataset name or None)`` of the task's input range."""
    source = payload
    if "start" not in payload and isinstance(payload.get("event"), dict):
        source = payload["event"].get("payload") or {}
    start, end = source.get("start"), source.get("end")
    if not _is_int(start) or not _is_int(end):
        raise NonRetryableError("the input needs an integer block range: start and end")
    assert isinstance(start, int) and isinstance(end, int)
    try:
        ranges.check_range(start, end)
    except ValueError as exc:
        raise NonRetryableError(str(exc)) from None
    dataset = source.get("dataset")
    return start, end, dataset if isinstance(dataset, str) else None


def _window(payload: dict[str, Any]) -> int:
    window = payload.get("blocks")
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise NonRetryableError("config.blocks (the window size) must be an integer >= 1")
    return window


def _announce(ctx: TaskContext, windows: list[ranges.Range]) -> None:
    for start, end in windows:
        key = f"{start}_{end}"
        ctx.final_events.append(
            {
                "key": f"window:{key}",
                "type": "range",
                "payload": {"start": start, "end": end, "partition_key": key},
            }
        )


async def range_splitter(ctx: TaskContext) -> dict[str, Any] | None:
    """Cuts its input range at multiples of config.blocks, one range event per piece."""
    start, end, _ = input_range(ctx.payload)
    pieces = ranges.split(start, end, _window(ctx.payload))
    _announce(ctx, pieces)
    return {"windows": len(pieces)}


def make_range_aggregator(store: StateStore) -> Operator:
    """The ``range_aggregator`` operator over ``store``."""

    async def range_aggregator(ctx: TaskContext) -> dict[str, Any] | None:
        """Announces each config.blocks window once ordered input ranges cover it, and again
        when a range inside it is committed again."""
        start, end, dataset = input_range(ctx.payload)
        window = _window(ctx.payload)
        origin = ctx.payload.get("origin", 0)
        if not isinstance(origin, int) or origin < 0 or origin % window:
            raise NonRetryableError("config.origin must be a multiple of config.blocks")
        task_id, attempt = ctx.task.task_id, ctx.attempt
        doc, version = await store.load(task_id, attempt, dataset)
        state = ranges.AggregatorState.from_doc(doc) if doc else ranges.AggregatorState(origin)
        event = ctx.payload.get("event")
        producer = event.get("producer_task_id") if isinstance(event, dict) else None
        source = (producer, task_id) if isinstance(producer, str) else None
        try:
            new, windows = ranges.aggregate(state, start, end, window, origin=origin, source=source)
        except ranges.Gap as exc:
            raise RuntimeError(str(exc)) from None  # retryable: wait for the missing ranges
        except ranges.Overlap as exc:
            raise NonRetryableError(str(exc)) from None
        if new != state:
            await store.save(task_id, attempt, new.to_doc(), version, dataset)
        _announce(ctx, windows)
        return {"windows": len(windows), "covered_until": new.next}

    return range_aggregator


OPERATORS: dict[str, Operator] = {"range_splitter": range_splitter}
