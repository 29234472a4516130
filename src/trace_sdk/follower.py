"""``chain_follower``: follow a chain's head and announce chunk-aligned block ranges.

Run by an interval trigger (one task per tick). Each run reads the node's head and announces
``[cursor, head - confirmations)`` as whole chunks of ``config.chunk`` blocks aligned to
multiples of it, as completion events (key ``range:{start}_{end}``, type ``range``, payload
``{start, end, partition_key}``) that the DAG fan-out hands to ``cryo_ingest``. The cursor is
durable operator state (``StateStore``: the platform's per-job state; Lite:
``trace_lite.operator_state.PgOperatorState``), so a restarted follower resumes where the last
one stopped.

Theory of operation: never a range twice, never a range lost
-------------------------------------------------------------
The cursor is written *before* the completion that carries the events (operator state and
completions are separate transactions), so the state records what it announces:
``{"cursor", "last_task", "last_ranges"}``. A run of task T reads it and:

* ``last_task`` is T: an earlier attempt of T moved the cursor and then died before its
  completion committed; T announces exactly ``last_ranges`` again (same keys) and writes
  nothing.
* ``last_task`` is another task that has not ended (queued, running, waiting to retry): that
  run's completion may still commit its ranges; T announces nothing and writes nothing.
* ``last_task`` ended ``completed``: its ranges are announced; T plans from the cursor.
* ``last_task`` ended ``failed`` or ``canceled``: its completion never committed, so its
  ranges were never announced; T carries them and announces them with its own.

The write is a compare-and-swap on the state's version: of two followers racing, one wins and
the other fails retryably (``Conflict``) and then sees the winner as ``last_task``.

Config (the job's ``config``; the trigger adds ``scheduled_time``)::

    chunk           blocks per range (default 100); ranges are [k*chunk, (k+1)*chunk)
    confirmations   blocks behind the head never announced (default 2)
    start           the first block (default 0; a multiple of chunk)
    max_ranges      ranges announced per run at most (default 50; the rest on later runs)
    rpc_url         the node's endpoint; without it the worker-pool slot's RPC_URL
"""

from __future__ import annotations

import json
from typing import Any, Protocol

import aiohttp
import attrs

from trace_core import errors
from trace_sdk._worker import NonRetryableError, Operator, TaskContext
from trace_sdk.ingest import rpc_endpoint
from trace_sdk.ranges import StateStore

#: Task states in which a task's completion can no longer commit.
_UNANNOUNCED = frozenset({"failed", "canceled"})


class FollowerStore(StateStore, Protocol):
    """A ``StateStore`` that can also tell the state of the task that last wrote the state."""

    async def writer_state(self, task_id: str, attempt: int, writer_task_id: str) -> str | None:
        """The lifecycle state of ``writer_task_id`` (a task of the same org and job as
        ``task_id``; None otherwise). Only ``task_id``'s running attempt may ask."""
        ...


@attrs.frozen
class FollowerState:
    """The durable cursor and what the last writer announced with it."""

    cursor: int
    last_task: str | None = None
    last_ranges: tuple[tuple[int, int], ...] = ()

    def to_doc(self) -> dict[str, Any]:
        return {
            "cursor": self.cursor,
            "last_task": self.last_task,
            "last_ranges": [list(r) for r in self.last_ranges],
        }

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> FollowerState:
        return cls(
            int(doc["cursor"]),
            doc.get("last_task"),
            tuple((int(s), int(e)) for s, e in doc.get("last_ranges", ())),
        )


def plan(
    cursor: int, head: int, *, chunk: int, confirmations: int, max_ranges: int
) -> list[tuple[int, int]]:
    """Whole chunks ``[s, s + chunk)`` from ``cursor`` (a multiple of ``chunk``) that end at or
    before ``head - confirmations`` (exclusive), at most ``max_ranges`` of them."""
    safe_end = head - confirmations
    out: list[tuple[int, int]] = []
    start = cursor
    while start + chunk <= safe_end and len(out) < max_ranges:
        out.append((start, start + chunk))
        start += chunk
    return out


def _int(payload: dict[str, Any], name: str, default: int, low: int) -> int:
    value = payload.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise NonRetryableError(f"config.{name} must be an integer >= {low}")
    return value


async def chain_head(rpc_url: str, timeout_s: float = 10.0) -> int:
    """``eth_blockNumber`` of the node at ``rpc_url``. Raises ``errors.Unavailable``."""
    body = {"jsonrpc": "2.0", "id": 1, "method": "eth_blockNumber", "params": []}
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session,
            session.post(rpc_url, json=body) as resp,
        ):
            answer = json.loads(await resp.read())
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        raise errors.Unavailable(f"eth_blockNumber: node unreachable: {exc}") from None
    if not isinstance(answer, dict) or "result" not in answer:
        raise errors.Unavailable(f"eth_blockNumber: no result: {str(answer)[:200]}")
    return int(answer["result"], 16)


def _announce(ctx: TaskContext, ranges: tuple[tuple[int, int], ...]) -> None:
    for start, end in ranges:
        key = f"{start}_{end}"
        ctx.final_events.append(
            {
                "key": f"range:{key}",
                "type": "range",
                "payload": {"start": start, "end": end, "partition_key": key},
            }
        )


def make_head_follower(store: FollowerStore) -> Operator:
    """The ``chain_follower`` operator over ``store`` (see the module docstring)."""

    async def chain_follower(ctx: TaskContext) -> dict[str, Any] | None:
        """Announces the chain's new confirmed chunks since the durable cursor."""
        payload = ctx.payload
        chunk = _int(payload, "chunk", 100, 1)
        confirmations = _int(payload, "confirmations", 2, 0)
        origin = _int(payload, "start", 0, 0)
        max_ranges = _int(payload, "max_ranges", 50, 1)
        if origin % chunk:
            raise NonRetryableError("config.start must be a multiple of config.chunk")
        rpc = rpc_endpoint(payload, ctx.env)
        task_id, attempt = ctx.task.task_id, ctx.attempt
        doc, version = await store.load(task_id, attempt)
        state = FollowerState.from_doc(doc) if doc else FollowerState(origin)
        if state.last_task == task_id:  # this task moved the cursor, then lost its completion
            _announce(ctx, state.last_ranges)
            return {"cursor": state.cursor, "ranges": len(state.last_ranges), "repeated": True}
        carried: tuple[tuple[int, int], ...] = ()
        if state.last_task is not None:
            writer = await store.writer_state(task_id, attempt, state.last_task)
            if writer in _UNANNOUNCED:
                carried = state.last_ranges
            elif writer != "completed":
                return {"cursor": state.cursor, "ranges": 0, "waiting_for": state.last_task}
        head = await chain_head(rpc)
        fresh = plan(
            state.cursor, head, chunk=chunk, confirmations=confirmations, max_ranges=max_ranges
        )
        ranges = carried + tuple(fresh)
        if not ranges:
            return {"cursor": state.cursor, "head": head, "ranges": 0}
        cursor = fresh[-1][1] if fresh else state.cursor
        new = FollowerState(cursor, task_id, ranges)
        await store.save(task_id, attempt, new.to_doc(), version)  # Conflict: retry
        _announce(ctx, ranges)
        return {"cursor": cursor, "head": head, "ranges": len(ranges), "carried": len(carried)}

    return chain_follower


__all__ = ["FollowerState", "FollowerStore", "chain_head", "make_head_follower", "plan"]
