"""What operator code is given: the ``TaskContext`` of its attempt (calls scoped to that
attempt's fence and capability token), and the exceptions an operator raises or sees."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import attrs

from trace_core import errors, wire
from trace_core.ports import ObjectStore, TaskSurface
from trace_sdk._process import child_env


class LeaseLostError(Exception):
    """Raised by the heartbeat when the lease is lost or the task canceled."""

    def __init__(self, canceled: bool = False) -> None:
        super().__init__("task canceled" if canceled else "lease lost")
        self.canceled = canceled


@attrs.define
class TaskContext:
    """What an operator may use: its task, and calls scoped to its own attempt."""

    task: wire.TaskPayload
    attempt: int
    _surface: TaskSurface
    _store: ObjectStore | None
    _fence: wire.FenceFields
    _token: list[str]  # boxed: the heartbeat renews it
    #: Events to bundle atomically with the completion.
    final_events: list[dict[str, Any]] = attrs.field(factory=list)
    #: The output manifest committed with a successful completion (``stage_output``).
    outputs: list[dict[str, Any]] = attrs.field(factory=list)
    #: The worker-pool slot's ``env`` with its ``secret_env`` resolved, for this attempt only
    #: (empty when the job uses no pool). Never logged.
    env: dict[str, str] = attrs.field(factory=dict, repr=False)

    @property
    def payload(self) -> dict[str, Any]:
        return self.task.payload

    async def emit(self, events: list[dict[str, Any]]) -> wire.EventsResponse:
        """Emit events now (``{"key", "type", "payload"}``; keys dedupe across attempts).
        Raises ``ValidationFailed`` for a malformed event, before any call."""
        req = wire.structure({**_fields(self._fence), "events": events}, wire.EventsRequest)
        return await self._surface.events(self._token[0], req)

    async def publish_buffer(
        self,
        dataset: str,
        rows: list[dict[str, Any]],
        *,
        key: str,
        scope: dict[str, Any] | None = None,
        inline: bool = False,
    ) -> wire.BufferPublishResponse:
        """Publish ``rows`` as a buffer batch: by default written as a JSON-lines object under
        the attempt's staging prefix and published as a pointer; with ``inline=True`` sent in
        the call itself (up to ``wire.INLINE_MAX_BYTES`` as JSON lines, no object store
        needed). ``scope`` (exactly one of ``{"cursor": str}``, ``{"partition_key": str}``,
        ``{"range": {"start": int, "end": int}}``) is part of every row's dedupe key. Raises
        ``ValidationFailed`` for a malformed batch."""
        batch: dict[str, Any] = {"key": key, "dataset": dataset}
        if scope is not None:
            batch["scope"] = scope
        if inline:
            batch["rows"] = rows
        else:
            if self._store is None:
                raise errors.Unavailable("this worker has no object store")
            data = b"".join(json.dumps(r, sort_keys=True).encode() + b"\n" for r in rows)
            object_key = f"{self.task.staging_prefix}buffer/{dataset}/{key}.jsonl"
            await self._store.put(object_key, data)
            batch |= {
                "object_key": object_key,
                "row_count": len(rows),
                "byte_size": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
            }
        req = wire.structure({**_fields(self._fence), "batch": batch}, wire.BufferPublishRequest)
        return await self._surface.buffer_publish(self._token[0], req)

    async def run_process(
        self, argv: Sequence[str], *, env: Mapping[str, str] | None = None, timeout_s: float = 60.0
    ) -> tuple[int, bytes]:
        """Run ``argv`` to completion with a minimal environment (``trace_sdk.child_env``: no
        platform credential, no worker settings) plus this attempt's pool-slot ``env`` and then
        ``env``, with stdin closed. Returns ``(exit code, stdout)``; raises ``TimeoutError``
        (the process is killed)."""
        proc = await asyncio.create_subprocess_exec(
            *argv,
            env=child_env({**self.env, **(env or {})}),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
        )
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), timeout_s)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise
        assert proc.returncode is not None
        return proc.returncode, out

    async def stage_output(
        self, dataset: str, name: str, data: bytes, partition: dict[str, Any]
    ) -> dict[str, Any]:
        """Write ``data`` under the attempt's staging prefix and add it to the output manifest
        committed with the completion (``partition``: ``{"start", "end"}`` or ``{"key"}``)."""
        if self._store is None:
            raise errors.Unavailable("this worker has no object store")
        object_key = f"{self.task.staging_prefix}out/{dataset}/{name}"
        info = await self._store.put(object_key, data)
        entry = {
            "dataset": dataset,
            "object_key": object_key,
            "size": info.size,
            "sha256": info.sha256,
            "partition": partition,
        }
        self.outputs.append(entry)
        return entry


Operator = Callable[[TaskContext], Awaitable[dict[str, Any] | None]]


class NonRetryableError(Exception):
    """An operator raises this for a failure retrying cannot fix."""


def _fields(fence: wire.FenceFields) -> dict[str, Any]:
    """The fence as request fields."""
    return {"task_id": fence.task_id, "attempt": fence.attempt, "lease_token": fence.lease_token}


__all__ = ["LeaseLostError", "NonRetryableError", "Operator", "TaskContext"]
