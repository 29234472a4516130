"""Completing attempts: the group commit of many completions in one transaction.

``TaskCompletions`` locks the tasks, asks the kernel for each decision
(``lifecycle.decide_complete``: fence, retry or finish, replay of the same body), records each
attempt's output manifests (``trace_lite.outputs``) and final events, and applies every
decision as one compare-and-swap.

Invariant: one completion of a group commit never changes another's outcome. Each request is
checked before any SQL (``_check_completion``: values jsonb cannot store, over the JSON limits,
repeated event keys); a request the kernel refuses gets its error while the others commit; and
if the shared transaction still fails on a value, every request is retried alone so only the
bad one gets the error. A database outage is ``Unavailable`` for all of them.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from typing import Any

from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from trace_core import errors, json_limits, lifecycle, wire
from trace_core.lifecycle import Fence, Outcome, RetryPolicy
from trace_core.ports import ObjectStore
from trace_lite.outputs import apply_outputs, prepare_outputs
from trace_lite.pg import pg_array, transaction
from trace_lite.task_rows import LockedTask, Q, fetch, insert_events

log = logging.getLogger("trace.dispatcher")


class TaskCompletions:
    """Finishes attempts, alone or in group commits (see the module docstring)."""

    def __init__(
        self,
        pool: AsyncConnectionPool,
        *,
        retry: RetryPolicy,
        object_store: ObjectStore | None,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.pool = pool
        self.retry = retry
        self.object_store = object_store
        self._rand = rand

    async def complete(self, req: wire.CompleteRequest) -> wire.CompleteResponse:
        """Finish the current attempt, with its final events, atomically.

        Same attempt, same body again → the same answer (``replay``); a different body →
        ``IdempotencyMismatch``. Raises ``ValidationFailed``, ``NotFound``, ``LeaseLost``,
        ``TaskCanceled``, ``Conflict``.
        """
        (res,) = await self.complete_many([req])
        if isinstance(res, errors.TraceError):
            raise res
        return res

    async def complete_many(
        self, reqs: Sequence[wire.CompleteRequest]
    ) -> list[wire.CompleteResponse | errors.TraceError]:
        """Complete many attempts in one transaction (group commit); per-request results.

        One request never changes another's outcome: each is checked before any SQL (values
        jsonb cannot store, repeated event keys), a request the kernel refuses gets its error
        while the others commit, and if the shared transaction still fails on a value, every
        request is retried alone so only the bad one gets the error. Raises ``ValidationFailed``
        for two requests of one task; a transient failure of the database is ``Unavailable`` in
        every request's result.
        """
        by_task: set[str] = set()
        for r in reqs:
            if r.task_id in by_task:
                raise errors.ValidationFailed("one completion per task per batch", field="task_id")
            by_task.add(r.task_id)
        results: list[wire.CompleteResponse | errors.TraceError | None] = [None] * len(reqs)
        todo: list[int] = []
        for i, r in enumerate(reqs):
            try:
                _check_completion(r)
            except errors.ValidationFailed as exc:
                results[i] = exc
            else:
                todo.append(i)
        batch = [reqs[i] for i in todo]
        try:
            answers = await self._complete_batch(batch)
        except errors.Unavailable as exc:  # the database, not a value: every request retries
            answers = [exc] * len(batch)
        except Exception as exc:
            if len(batch) == 1:
                if not isinstance(exc, errors.TraceError):
                    raise
                answers = [exc]
            else:
                log.warning(
                    "completion batch failed; completing its requests one by one",
                    extra={"error": f"{type(exc).__name__}: {exc}", "rows": len(batch)},
                )
                answers = [await self._complete_alone(r) for r in batch]
        for i, answer in zip(todo, answers, strict=True):
            results[i] = answer
        return [
            errors.NotFound("no such task", field="task_id") if r is None else r for r in results
        ]

    async def _complete_alone(
        self, req: wire.CompleteRequest
    ) -> wire.CompleteResponse | errors.TraceError:
        try:
            (answer,) = await self._complete_batch([req])
        except errors.TraceError as exc:
            return exc
        except Exception:  # a bug: this request alone fails, and the log says why
            log.exception("completion failed", extra={"task_id": req.task_id})
            return errors.Unavailable("completion failed")
        return answer

    async def _complete_batch(
        self, reqs: Sequence[wire.CompleteRequest]
    ) -> list[wire.CompleteResponse | errors.TraceError]:
        """``complete_many``'s transaction over checked requests (one per task); raises what
        the transaction raises."""
        if not reqs:
            return []
        digests = [wire.canonical_digest(r) for r in reqs]
        by_task = {r.task_id: i for i, r in enumerate(reqs)}
        results: list[wire.CompleteResponse | errors.TraceError | None] = [None] * len(reqs)
        # Output manifests are checked against the ObjectStore before the transaction and
        # recorded inside it, behind the fence (trace_lite.outputs, trace_core.commit).
        outputs: dict[int, Any] = {}
        if any(r.outputs for r in reqs):
            outputs = await prepare_outputs(self.pool, self.object_store, reqs)
        async with transaction(self.pool) as cur:
            rows = await fetch(
                cur, LockedTask, Q["lock_tasks"], {"task_ids": pg_array(list(by_task))}
            )
            apply: list[tuple[int, lifecycle.CompleteDecision]] = []
            for row in rows:
                view = row.view
                now = row.now
                i = by_task[view.task_id]
                r = reqs[i]
                try:
                    decision = lifecycle.decide_complete(
                        view,
                        Fence(r.task_id, r.attempt, r.lease_token),
                        outcome=Outcome(r.outcome),
                        retryable=r.retryable,
                        digest=digests[i],
                        now=now,
                        retry=self.retry,
                        rand=self._rand(),
                        error=r.error,
                    )
                except errors.TraceError as exc:
                    results[i] = exc
                    continue
                if decision.replay:
                    results[i] = wire.CompleteResponse(r.task_id, r.attempt, view.state.value, True)
                    continue
                if i in outputs:
                    try:
                        if isinstance(outputs[i], errors.TraceError):
                            raise outputs[i]
                        await apply_outputs(cur, r, outputs[i])
                    except errors.TraceError as exc:
                        results[i] = exc
                        continue
                apply.append((i, decision))
            if apply:
                for i, _ in apply:
                    r = reqs[i]
                    await insert_events(
                        cur, Fence(r.task_id, r.attempt, r.lease_token), r.final_events
                    )
                await cur.execute(
                    Q["apply_completions"],
                    {
                        "task_ids": pg_array([reqs[i].task_id for i, _ in apply]),
                        "attempts": pg_array([reqs[i].attempt for i, _ in apply]),
                        "lease_tokens": pg_array([reqs[i].lease_token for i, _ in apply]),
                        "states": pg_array([d.state.value for _, d in apply]),
                        "outcomes": pg_array([d.attempt_outcome.value for _, d in apply]),
                        "available_ats": pg_array([d.available_at for _, d in apply]),
                        "lease_expires_ats": pg_array([d.lease_expires_at for _, d in apply]),
                        "finished_ats": pg_array([d.finished_at for _, d in apply]),
                        "results": [
                            Jsonb(reqs[i].result) if reqs[i].result is not None else None
                            for i, _ in apply
                        ],
                        "errors": [
                            Jsonb(dict(d.error)) if d.error is not None else None for _, d in apply
                        ],
                        "digests": pg_array([digests[i] for i, _ in apply]),
                    },
                )
                if cur.rowcount != len(apply):  # pragma: no cover - the rows are locked
                    raise errors.Conflict("a task changed while being completed")
                for i, d in apply:
                    r = reqs[i]
                    results[i] = wire.CompleteResponse(r.task_id, r.attempt, d.state.value, False)
        return [
            errors.NotFound("no such task", field="task_id") if r is None else r for r in results
        ]


def _check_completion(req: wire.CompleteRequest) -> None:
    """Refuse a completion that could fail in SQL, before it shares a transaction with others.

    Raises ``ValidationFailed`` naming the field: a value jsonb cannot store or over the JSON
    limits (``trace_core.json_limits``), or an event key repeated in one call.
    """
    if req.result is not None:
        json_limits.check(req.result, path="result")
    if req.error is not None:
        json_limits.check(req.error, path="error")
    keys: set[str] = set()
    for j, event in enumerate(req.final_events):
        if event.key in keys:
            raise errors.ValidationFailed(
                "event keys must be unique in one call", field=f"final_events[{j}].key"
            )
        keys.add(event.key)
        json_limits.check(event.payload, path=f"final_events[{j}].payload")
    if req.outputs:
        json_limits.check(wire.unstructure(req.outputs), path="outputs")


__all__ = ["TaskCompletions"]
