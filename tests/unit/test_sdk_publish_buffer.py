"""``TaskContext.publish_buffer``: a staged batch (object written, pointer published) or an
inline one (rows in the call, nothing written), with an optional scope, over the fake surface."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from trace_core import errors, wire
from trace_core.testing import FakeTaskSurface, MemoryObjectStore, TaskCall
from trace_sdk import TaskContext

TASK = "00000000-0000-4000-8000-000000000001"
LEASE = "00000000-0000-4000-8000-00000000aaaa"


def context(store: MemoryObjectStore, calls: list[wire.BufferPublishRequest]) -> TaskContext:
    def answer(call: TaskCall) -> Any:
        assert isinstance(call.request, wire.BufferPublishRequest)
        calls.append(call.request)
        return wire.BufferPublishResponse(accepted=True, duplicate=False)

    task = wire.TaskPayload(TASK, "org", None, "op", {}, "running", 1, 3, 30, f"p/{TASK}/")
    fence = wire.FenceFields(TASK, 1, LEASE)
    return TaskContext(task, 1, FakeTaskSurface(answer), store, fence, ["tok"])


async def test_staged_and_inline_batches_with_a_scope() -> None:
    store = MemoryObjectStore()
    calls: list[wire.BufferPublishRequest] = []
    ctx = context(store, calls)
    rows = [{"a": 1}, {"a": 2}]
    scope = {"range": {"start": 0, "end": 10}}
    await ctx.publish_buffer("ds", rows, key="s", scope=scope)
    await ctx.publish_buffer("ds", rows, key="i", scope={"cursor": "c"}, inline=True)
    staged, inline = (c.batch for c in calls)
    assert staged.scope == wire.BufferScopeIn(range=wire.RangeIn(0, 10)) and staged.rows is None
    assert staged.object_key is not None
    data = await store.get(staged.object_key)
    assert (staged.row_count, staged.byte_size) == (2, len(data))
    assert staged.sha256 == hashlib.sha256(data).hexdigest()
    assert (inline.rows, inline.object_key, inline.scope) == (
        rows,
        None,
        wire.BufferScopeIn(cursor="c"),
    )


async def test_a_bad_scope_is_refused_before_any_call() -> None:
    calls: list[wire.BufferPublishRequest] = []
    ctx = context(MemoryObjectStore(), calls)
    with pytest.raises(errors.ValidationFailed) as info:
        await ctx.publish_buffer("ds", [{"a": 1}], key="i", scope={}, inline=True)
    assert info.value.field == "batch.scope.cursor" and calls == []
