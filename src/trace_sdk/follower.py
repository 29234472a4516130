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

Reorgs
------
The state also keeps the hash of every announced block of the last ``reorg_window`` blocks
below the cursor (fetched when the block is announced). Each run asks the node for those
blocks' hashes again (one batched request); when some changed, the chain reorganised from the
lowest changed block ``f``: the chunks from ``f``'s chunk up to the cursor are announced again
as ``reorg:{start}_{end}`` events (payload ``reorg: true``), so ``cryo_ingest`` extracts them
again and its ``replace`` outputs rewrite exactly those ranges (the commit's invalidation and the
new range events rerun what was built from them). While the new fork is still shorter than
the cursor plus ``confirmations``, the run waits (announces nothing) until it is long enough.
These re-announcements are part of ``last_ranges``' guarantee (kept as ``last_reorged``). A
change at the lowest remembered block (other than ``start``) may reach below the window: the
window is extracted again, the task's result names the block (``reorg_may_reach_below``) and a
warning is logged; blocks below it are not checked (a backfill over them replaces them).

What was committed is checked too (``config.verify``: the blocks dataset, published by the
follower's own DAG). Comparing the node only with its own earlier reads, the follower misses an
extract that saw another chain than both of them: a fork that was the node's head only while
the extract ran (the race between this run's hash read and the extract), an ingest slot whose
node is on another fork, or an older extract of a range committing after a newer one. So each
run also reads, for the live blocks partitions inside the window, the digest of their block
hashes that ``cryo_ingest`` recorded in the blocks range event (``trace_sdk.block_hashes``)
and compares it with the digest of the node's hashes of the same blocks; a range that differs
is announced again as ``reorg:{start}_{end}`` (its task result counts them as ``stale``). A
range announced again is remembered with the partition it replaces (``stale`` in the state),
and not announced again while that partition is still live (its re-extract has not committed
yet). A partition committed without a digest (before digests were recorded) is not checked.
An announced range is also remembered until its commit was checked once (``unchecked``, at
most ``MAX_UNCHECKED``, the oldest dropped with a warning), so a range whose ingest lagged
until it fell below the window is still checked when it commits.
Limits: a reorg is seen at most one run (one trigger interval) after it happened; below the
window a range is checked once, when it has committed (a later change there is not seen); the
digest covers the blocks file (transactions and logs are fetched by other requests of the same
extract and are not tied to these hashes).

Config (the job's ``config``; the trigger adds ``scheduled_time``)::

    chunk           blocks per range (default 100); ranges are [k*chunk, (k+1)*chunk)
    confirmations   blocks behind the head never announced (default 2)
    start           the first block (default 0; a multiple of chunk)
    max_ranges      ranges announced per run at most (default 50; the rest on later runs)
    reorg_window    blocks below the cursor whose hashes are checked each run (default 64)
    verify          the blocks dataset (published by this DAG) whose committed ranges inside
                    the window are checked against the node (default: none)
    rpc_url         the node's endpoint; without it the worker-pool slot's RPC_URL
"""

from __future__ import annotations

import json
import logging
from typing import Any, Protocol

import aiohttp
import attrs

from trace_core import errors
from trace_sdk._worker import NonRetryableError, Operator, TaskContext
from trace_sdk.block_hashes import hex_hashes_digest
from trace_sdk.ingest import rpc_endpoint
from trace_sdk.ranges import StateStore

log = logging.getLogger("trace.follower")

#: Announced ranges below the window whose commit the follower still waits to check, at most.
MAX_UNCHECKED = 1000

#: Task states in which a task's completion can no longer commit.
_UNANNOUNCED = frozenset({"failed", "canceled"})


class FollowerStore(StateStore, Protocol):
    """A ``StateStore`` that can also tell the state of the task that last wrote the state."""

    async def writer_state(self, task_id: str, attempt: int, writer_task_id: str) -> str | None:
        """The lifecycle state of ``writer_task_id`` (a task of the same org and job as
        ``task_id``; None otherwise). Only ``task_id``'s running attempt may ask."""
        ...


Ranges = tuple[tuple[int, int], ...]


@attrs.frozen
class CommittedRange:
    """A live partition of the blocks dataset and the digest of its block hashes
    (``trace_sdk.block_hashes``) that the extract which committed it recorded (None: none)."""

    start: int
    end: int
    partition_id: int
    hashes_sha256: str | None


class CommittedBlocks(Protocol):
    """What the follower's own DAG committed of a blocks dataset."""

    async def committed(
        self, task_id: str, attempt: int, dataset: str, low: int, high: int
    ) -> list[CommittedRange]:
        """The live partitions of ``dataset`` -- published by the DAG of ``task_id``, in its
        active version -- that lie inside ``[low, high)``, by start. Only ``task_id``'s running
        attempt may ask (``LeaseLost``)."""
        ...


@attrs.frozen
class FollowerState:
    """The durable cursor, what the last writer announced with it, and the hashes of the
    announced blocks inside the reorg window."""

    cursor: int
    last_task: str | None = None
    last_ranges: Ranges = ()
    last_reorged: Ranges = ()
    hashes: tuple[tuple[int, str], ...] = ()
    #: Ranges announced again, each with the live blocks partition it replaces (-1: none was
    #: committed): while that partition is still live its re-extract has not committed.
    stale: tuple[tuple[int, int, int], ...] = ()
    #: Announced ranges whose committed blocks were not checked yet (kept below the window
    #: until they are, at most ``MAX_UNCHECKED``).
    unchecked: Ranges = ()

    def to_doc(self) -> dict[str, Any]:
        return {
            "cursor": self.cursor,
            "last_task": self.last_task,
            "last_ranges": [list(r) for r in self.last_ranges],
            "last_reorged": [list(r) for r in self.last_reorged],
            "hashes": {str(b): h for b, h in self.hashes},
            "stale": [list(r) for r in self.stale],
            "unchecked": [list(r) for r in self.unchecked],
        }

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> FollowerState:
        return cls(
            int(doc["cursor"]),
            doc.get("last_task"),
            tuple((int(s), int(e)) for s, e in doc.get("last_ranges", ())),
            tuple((int(s), int(e)) for s, e in doc.get("last_reorged", ())),
            tuple(sorted((int(b), str(h)) for b, h in doc.get("hashes", {}).items())),
            tuple((int(s), int(e), int(p)) for s, e, p in doc.get("stale", ())),
            tuple((int(s), int(e)) for s, e in doc.get("unchecked", ())),
        )


def reorged_ranges(
    remembered: tuple[tuple[int, str], ...],
    now: dict[int, str | None],
    *,
    cursor: int,
    chunk: int,
) -> tuple[Ranges, bool]:
    """The chunks to extract again -- from the chunk of the lowest remembered block whose hash
    changed (``now``: the node's answer; None for a block it no longer has) up to ``cursor``
    -- and whether the fork may lie below the window (the lowest remembered block changed)."""
    changed = [b for b, h in remembered if now.get(b) != h]
    if not changed:
        return (), False
    fork = changed[0]
    first = fork // chunk * chunk
    return tuple((s, s + chunk) for s in range(first, cursor, chunk)), fork == remembered[0][0]


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


async def _rpc(rpc_url: str, body: Any, timeout_s: float = 10.0) -> Any:
    """One JSON-RPC request (or batch) to the node. Raises ``errors.Unavailable``."""
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session,
            session.post(rpc_url, json=body) as resp,
        ):
            return json.loads(await resp.read())
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        raise errors.Unavailable(f"node unreachable: {exc}") from None


async def chain_head(rpc_url: str) -> int:
    """``eth_blockNumber`` of the node at ``rpc_url``. Raises ``errors.Unavailable``."""
    body = {"jsonrpc": "2.0", "id": 1, "method": "eth_blockNumber", "params": []}
    answer = await _rpc(rpc_url, body)
    if not isinstance(answer, dict) or "result" not in answer:
        raise errors.Unavailable(f"eth_blockNumber: no result: {str(answer)[:200]}")
    return int(answer["result"], 16)


async def block_hashes(rpc_url: str, numbers: list[int]) -> dict[int, str | None]:
    """The hash of each block in ``numbers`` (None for a block the node does not have), in
    one batched request. Raises ``errors.Unavailable``."""
    if not numbers:
        return {}
    body = [
        {"jsonrpc": "2.0", "id": b, "method": "eth_getBlockByNumber", "params": [hex(b), False]}
        for b in numbers
    ]
    answer = await _rpc(rpc_url, body)
    if not isinstance(answer, list) or len(answer) != len(numbers):
        raise errors.Unavailable(f"eth_getBlockByNumber batch: {str(answer)[:200]}")
    out: dict[int, str | None] = {}
    for item in answer:
        if not isinstance(item, dict) or "result" not in item:
            raise errors.Unavailable(f"eth_getBlockByNumber: {str(item)[:200]}")
        block = item["result"]
        out[int(item["id"])] = block["hash"] if isinstance(block, dict) else None
    return out


def _announce(ctx: TaskContext, ranges: Ranges, reorged: Ranges = ()) -> None:
    for kind, announced in (("reorg", reorged), ("range", ranges)):
        for start, end in announced:
            key = f"{start}_{end}"
            payload: dict[str, Any] = {"start": start, "end": end, "partition_key": key}
            if kind == "reorg":
                payload["reorg"] = True
            ctx.final_events.append({"key": f"{kind}:{key}", "type": "range", "payload": payload})


def stale_ranges(
    committed: list[CommittedRange],
    now: dict[int, str | None],
    awaiting: dict[tuple[int, int], int],
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Of the ``committed`` ranges, those whose recorded digest differs from the digest of the
    node's hashes ``now`` (a block the node lacks differs too), and those that match. A range
    whose digest is unknown, or whose live partition is the one ``awaiting`` names (announced
    again, its re-extract not committed yet), is neither."""
    stale: list[tuple[int, int]] = []
    good: list[tuple[int, int]] = []
    for c in committed:
        span = (c.start, c.end)
        if c.hashes_sha256 is None or awaiting.get(span) == c.partition_id:
            continue
        node = [now.get(b) for b in range(c.start, c.end)]
        hashes = [h for h in node if h is not None]
        if len(hashes) == len(node) and hex_hashes_digest(hashes) == c.hashes_sha256:
            good.append(span)
        else:
            stale.append(span)
    return stale, good


def make_head_follower(store: FollowerStore, committed: CommittedBlocks | None = None) -> Operator:
    """The ``chain_follower`` operator over ``store``; with ``committed`` it also checks what
    was committed (``config.verify``; see the module docstring)."""

    async def chain_follower(ctx: TaskContext) -> dict[str, Any] | None:
        """Announces the chain's new confirmed chunks since the durable cursor."""
        payload = ctx.payload
        chunk = _int(payload, "chunk", 100, 1)
        confirmations = _int(payload, "confirmations", 2, 0)
        origin = _int(payload, "start", 0, 0)
        max_ranges = _int(payload, "max_ranges", 50, 1)
        window = _int(payload, "reorg_window", 64, 1)
        if origin % chunk:
            raise NonRetryableError("config.start must be a multiple of config.chunk")
        verify = payload.get("verify")
        if verify is not None and (not isinstance(verify, str) or not verify):
            raise NonRetryableError("config.verify must name the blocks dataset")
        if verify is not None and committed is None:
            raise NonRetryableError("config.verify: this worker cannot read committed ranges")
        rpc = rpc_endpoint(payload, ctx.env)
        task_id, attempt = ctx.task.task_id, ctx.attempt
        doc, version = await store.load(task_id, attempt)
        state = FollowerState.from_doc(doc) if doc else FollowerState(origin)
        if state.last_task == task_id:  # this task moved the cursor, then lost its completion
            _announce(ctx, state.last_ranges, state.last_reorged)
            return {"cursor": state.cursor, "ranges": len(state.last_ranges), "repeated": True}
        carried: Ranges = ()
        carried_reorged: Ranges = ()
        if state.last_task is not None:
            writer = await store.writer_state(task_id, attempt, state.last_task)
            if writer in _UNANNOUNCED:
                carried, carried_reorged = state.last_ranges, state.last_reorged
            elif writer != "completed":
                return {"cursor": state.cursor, "ranges": 0, "waiting_for": state.last_task}
        head = await chain_head(rpc)
        now = await block_hashes(rpc, [b for b, _ in state.hashes])
        reorged, beyond = reorged_ranges(state.hashes, now, cursor=state.cursor, chunk=chunk)
        beyond = beyond and state.hashes[0][0] != origin
        if beyond:
            log.warning(
                "reorg at the lowest remembered block: blocks below it may be stale",
                extra={"block": state.hashes[0][0], "task_id": task_id},
            )
        # what was committed, checked against the node: an extract may have seen another
        # chain than both of this follower's reads (module docstring)
        awaiting = {(s, e): p for s, e, p in state.stale}
        unchecked = set(state.unchecked)
        live: dict[tuple[int, int], int] = {}
        stale: list[tuple[int, int]] = []
        check_low = max(origin, state.cursor - window)
        if verify is not None and committed is not None and state.cursor > origin:
            # the window's committed ranges, and those below it not checked yet
            low_q = min([check_low, *(s for s, _ in unchecked)])
            found = [
                c
                for c in await committed.committed(task_id, attempt, verify, low_q, state.cursor)
                if c.start >= check_low or (c.start, c.end) in unchecked
            ]
            live = {(c.start, c.end): c.partition_id for c in found}
            missing = [b for c in found for b in range(c.start, c.end) if b not in now]
            now = {**now, **await block_hashes(rpc, missing)}
            stale, good = stale_ranges(found, now, awaiting)
            for span in good:
                awaiting.pop(span, None)
            unchecked -= {(c.start, c.end) for c in found if c.hashes_sha256 is None}
            unchecked -= set(good)
            if stale:
                log.warning(
                    "committed blocks differ from the node's: extracting them again",
                    extra={"ranges": stale, "task_id": task_id},
                )
            reorged = tuple(sorted(set(reorged) | set(stale)))
        if reorged and reorged[-1][1] > head - confirmations:
            # the new fork is not yet as long as what was announced: re-extracting now would
            # ask for blocks past its head; the changed hashes are seen again next run
            return {"cursor": state.cursor, "head": head, "ranges": 0, "reorg_waits": True}
        fresh = plan(
            state.cursor, head, chunk=chunk, confirmations=confirmations, max_ranges=max_ranges
        )
        ranges = carried + tuple(fresh)
        reorged_all = tuple(dict.fromkeys(carried_reorged + reorged))
        if not ranges and not reorged_all and unchecked == set(state.unchecked):
            return {"cursor": state.cursor, "head": head, "ranges": 0}
        cursor = fresh[-1][1] if fresh else state.cursor
        # remember the hashes of the window below the new cursor: unchanged ones as they
        # were, the re-announced and the new blocks as the node answers now
        low = max(origin, cursor - window)
        kept = {b: h for b, h in state.hashes if b >= low and now.get(b) == h}
        fetch = [b for b in range(low, cursor) if b not in kept]
        fetched = await block_hashes(rpc, fetch)
        hashes = {**kept, **{b: h for b, h in fetched.items() if h is not None}}
        # each range announced again waits for its re-extract: the partition it replaces
        for span in reorged:
            awaiting[span] = live.get(span, -1)
        if verify is not None:
            unchecked |= set(ranges) | set(reorged_all)
        dropped = sorted(unchecked)[:-MAX_UNCHECKED]
        if dropped:
            log.warning(
                "too many announced ranges not committed yet: some will not be checked",
                extra={"first": dropped[0], "last": dropped[-1], "task_id": task_id},
            )
            unchecked -= set(dropped)
        waiting = tuple(
            sorted((s, e, p) for (s, e), p in awaiting.items() if e > low or (s, e) in unchecked)
        )
        new = FollowerState(
            cursor,
            task_id,
            ranges,
            reorged_all,
            tuple(sorted(hashes.items())),
            waiting,
            tuple(sorted(unchecked)),
        )
        await store.save(task_id, attempt, new.to_doc(), version)  # Conflict: retry
        _announce(ctx, ranges, reorged_all)
        return {
            "cursor": cursor,
            "head": head,
            "ranges": len(ranges),
            "carried": len(carried),
            "reorged": len(reorged_all),
            "stale": len(stale),
            "reorg_may_reach_below": state.hashes[0][0] if beyond else None,
        }

    return chain_follower


__all__ = [
    "CommittedBlocks",
    "CommittedRange",
    "FollowerState",
    "FollowerStore",
    "block_hashes",
    "chain_head",
    "make_head_follower",
    "plan",
    "reorged_ranges",
    "stale_ranges",
]
