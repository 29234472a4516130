"""The fenced writes of a running attempt, short of its completion: heartbeats (lease
extension and a renewed capability token), events, and buffer batch pointers.

``AttemptWrites`` locks the task, has the kernel check the fence ``(task_id, attempt,
lease_token)`` at the database's ``now()`` (``lifecycle.check_fence``, ``decide_heartbeat``) and
writes in the same transaction; a lease that moved on is ``LeaseLost``, a canceled task
``TaskCanceled``. Repeats are no-ops: an event key already emitted by the task is skipped, and
a buffer batch key re-published with the same pointer answers ``duplicate``.
"""

from __future__ import annotations

import hashlib
from typing import Any, NamedTuple

from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from trace_core import errors, json_limits, lifecycle, wire
from trace_core.lifecycle import Fence, LeasePolicy, Op
from trace_core.object_keys import is_within, staging_prefix, validate_key
from trace_core.ports import ObjectStore
from trace_core.sink import inline_lines
from trace_lite.attempt_tokens import AttemptTokens
from trace_lite.pg import transaction
from trace_lite.task_rows import (
    BufferBatchRow,
    Q,
    fetch,
    insert_events,
    lock_task,
    stored_json,
    task_row,
)


class AttemptWrites:
    """Heartbeats, events and buffer publishes of running attempts (see the module
    docstring)."""

    def __init__(
        self,
        pool: AsyncConnectionPool,
        *,
        lease: LeasePolicy,
        tokens: AttemptTokens,
        object_store: ObjectStore | None,
    ) -> None:
        self.pool = pool
        self.lease = lease
        self.tokens = tokens
        self.object_store = object_store

    async def heartbeat(self, req: wire.HeartbeatRequest) -> wire.HeartbeatResponse:
        """Extend the lease (never past the attempt's ``timeout_s``) and renew the capability
        token.

        Raises ``NotFound``, ``LeaseLost``, ``TaskCanceled``.
        """
        fence = Fence(req.task_id, req.attempt, req.lease_token)
        async with transaction(self.pool) as cur:
            locked = await lock_task(cur, req.task_id)
            decision = lifecycle.decide_heartbeat(
                locked.view, fence, now=locked.now, lease=self.lease
            )
            await cur.execute(
                Q["apply_heartbeat"],
                {
                    "task_id": fence.task_id,
                    "attempt": fence.attempt,
                    "lease_token": fence.lease_token,
                    "expires": decision.lease_expires_at,
                },
            )
            if cur.rowcount != 1:
                raise errors.LeaseLost()
        token = await self.tokens.mint(
            org_id=locked.org_id,
            task_id=req.task_id,
            attempt=req.attempt,
            timeout_s=locked.timeout_s,
            read_datasets=locked.grants,
        )
        return wire.HeartbeatResponse(
            lease_expires_at=decision.lease_expires_at.isoformat(), capability_token=token
        )

    async def running_attempt(self, req: wire.FenceFields) -> tuple[str, int, dict[str, Any]]:
        """``(org_id, timeout_s, payload)`` of the running attempt ``req`` fences (the
        heartbeat's fence rules: current attempt, its lease token, task running). Used to scope
        credentials to the attempt. Raises ``NotFound``, ``LeaseLost``, ``TaskCanceled``,
        ``Conflict`` for a stored payload that cannot be served."""
        fence = Fence(req.task_id, req.attempt, req.lease_token)
        async with transaction(self.pool) as cur:
            locked = await lock_task(cur, req.task_id)
            lifecycle.check_fence(locked.view, fence, Op.HEARTBEAT, now=locked.now)
            row = await task_row(cur, req.task_id)
        return row.org_id, row.timeout_s, dict(stored_json(row.payload, "payload") or {})

    async def emit_events(self, req: wire.EventsRequest) -> wire.EventsResponse:
        """Record events of the current attempt; keys already emitted by the task are skipped.

        Raises ``ValidationFailed`` (a payload over the JSON limits, a key twice in one call),
        ``NotFound``, ``LeaseLost``, ``TaskCanceled``, ``Conflict``.
        """
        fence = Fence(req.task_id, req.attempt, req.lease_token)
        for j, event in enumerate(req.events):
            json_limits.check(event.payload, path=f"events[{j}].payload")
        async with transaction(self.pool) as cur:
            locked = await lock_task(cur, req.task_id)
            lifecycle.check_fence(locked.view, fence, Op.EVENTS, now=locked.now)
            inserted = await insert_events(cur, fence, req.events)
        return wire.EventsResponse(accepted=inserted, duplicates=len(req.events) - inserted)

    async def publish_buffer(self, req: wire.BufferPublishRequest) -> wire.BufferPublishResponse:
        """Record a buffer batch pointer of the current attempt and announce it to the sink.

        The object must lie under the attempt's staging prefix and match its declared size and
        checksum. A repeated key with the same pointer is a no-op. Raises ``UnsafeKey``,
        ``ValidationFailed``, ``NotFound``, ``LeaseLost``, ``TaskCanceled``,
        ``IdempotencyMismatch``, ``Forbidden`` (a dataset another DAG produces).
        """
        fence = Fence(req.task_id, req.attempt, req.lease_token)
        batch = req.batch
        inline: str | None = None
        if batch.rows is not None:
            for j, r in enumerate(batch.rows):
                json_limits.check(r, path=f"batch.rows[{j}]")
            data = inline_lines(batch.rows)
            inline = data.decode()
            if len(data) > wire.INLINE_MAX_BYTES:
                raise errors.ValidationFailed(
                    f"inline rows take {len(data)} bytes as JSON lines, more than "
                    f"{wire.INLINE_MAX_BYTES}: stage them as an object",
                    field="batch.rows",
                )
            mine = BufferBatchRow(
                batch.dataset,
                None,
                len(batch.rows),
                len(data),
                hashlib.sha256(data).hexdigest(),
                req.attempt,
                _scope_doc(batch.scope),
            )
        else:
            validate_key(str(batch.object_key))
            mine = BufferBatchRow(
                batch.dataset,
                batch.object_key,
                int(batch.row_count or 0),
                int(batch.byte_size or 0),
                str(batch.sha256),
                req.attempt,
                _scope_doc(batch.scope),
            )
        async with transaction(self.pool) as cur:
            locked = await lock_task(cur, req.task_id)
            lifecycle.check_fence(locked.view, fence, Op.BUFFER_PUBLISH, now=locked.now)
            params = {"task_id": req.task_id, "dataset": batch.dataset}
            allowed = await fetch(cur, _WriteAllowed, Q["buffer_write_allowed"], params)
            if allowed and not allowed[0].allowed:
                raise errors.Forbidden(
                    f"dataset {batch.dataset!r} is produced by another DAG: a DAG's tasks "
                    "write only the datasets their DAG produces or is a registered writer of",
                    field="batch.dataset",
                )
            prefix = staging_prefix(locked.org_id, req.task_id, req.attempt)
            if batch.object_key is not None and not is_within(batch.object_key, prefix):
                raise errors.UnsafeKey(
                    f"object_key must lie under the attempt's staging prefix {prefix}",
                    field="batch.object_key",
                )
            found = await fetch(
                cur, BufferBatchRow, Q["buffer_batch"], {"task_id": req.task_id, "key": batch.key}
            )
            if found:
                if not _same_batch(found[0], mine):
                    raise errors.IdempotencyMismatch("batch key reused with another pointer")
                return wire.BufferPublishResponse(accepted=True, duplicate=True)
            if self.object_store is not None and batch.object_key is not None:
                info = await self.object_store.head(batch.object_key)
                if info.size != mine.byte_size or info.sha256 != mine.sha256:
                    raise errors.ValidationFailed(
                        "the object does not match byte_size/sha256", field="batch.sha256"
                    )
            await cur.execute(
                Q["insert_buffer_batch"],
                {
                    "task_id": req.task_id,
                    "key": batch.key,
                    "attempt": req.attempt,
                    "dataset": batch.dataset,
                    "object_key": mine.object_key,
                    "row_count": mine.row_count,
                    "byte_size": mine.byte_size,
                    "sha256": mine.sha256,
                    "scope": Jsonb(mine.scope) if mine.scope is not None else None,
                    "rows": inline,
                },
            )
            await cur.execute(
                Q["insert_buffer_announcement"],
                {
                    "topic": f"buffer:{batch.dataset}",
                    "payload": Jsonb(
                        {
                            "task_id": req.task_id,
                            "batch_key": batch.key,
                            "object_key": batch.object_key,
                        }
                    ),
                },
            )
        return wire.BufferPublishResponse(accepted=True, duplicate=False)


class _WriteAllowed(NamedTuple):
    """``buffer_write_allowed``: may the task write the dataset named."""

    allowed: bool


def _scope_doc(scope: wire.BufferScopeIn | None) -> dict[str, Any] | None:
    """The stored form of a batch scope: ``{"cursor": c}``, ``{"partition_key": k}`` or
    ``{"range": {"start": s, "end": e}}``."""
    if scope is None:
        return None
    doc: dict[str, Any] = wire.unstructure(scope)
    return {name: value for name, value in doc.items() if value is not None}


def _same_batch(found: BufferBatchRow, mine: BufferBatchRow) -> bool:
    """Whether re-publishing the pointer ``mine`` repeats the recorded pointer ``found``."""
    if found.scope != mine.scope:
        return False
    if found.attempt == mine.attempt:
        return (
            found.dataset,
            found.object_key,
            found.row_count,
            found.byte_size,
            found.sha256,
        ) == (mine.dataset, mine.object_key, mine.row_count, mine.byte_size, mine.sha256)
    # A retried attempt re-publishing the key stages its object under its own prefix: the same
    # content is a duplicate (the first pointer stands).
    return (found.dataset, found.row_count, found.byte_size, found.sha256) == (
        mine.dataset,
        mine.row_count,
        mine.byte_size,
        mine.sha256,
    )


__all__ = ["AttemptWrites"]
