"""The optional scope of ``/v1/task/buffer-publish`` (``wire.BufferScopeIn``): exactly one of a
cursor, a partition key or a half-open range, refused with the field path otherwise."""

from __future__ import annotations

from typing import Any

import pytest

from trace_core import errors, wire
from trace_core.sink import Scope
from trace_lite.buffer_forwarder import BufferMessage

FENCE = {
    "task_id": "00000000-0000-4000-8000-000000000001",
    "attempt": 1,
    "lease_token": "00000000-0000-4000-8000-000000000002",
}
BATCH = {
    "key": "b1",
    "dataset": "transfers",
    "object_key": "o",
    "row_count": 1,
    "byte_size": 1,
    "sha256": "0" * 64,
}


def publish(scope: Any) -> wire.BufferPublishRequest:
    return wire.structure({**FENCE, "batch": {**BATCH, "scope": scope}}, wire.BufferPublishRequest)


@pytest.mark.parametrize(
    ("scope", "field"),
    [
        ({}, "batch.scope.cursor"),
        ({"cursor": "c", "range": {"start": 0, "end": 1}}, "batch.scope.range"),
        ({"cursor": "c", "partition_key": "p"}, "batch.scope.partition_key"),
        ({"range": {"start": 5, "end": 5}}, "batch.scope.range.end"),
        ({"range": {"start": -1, "end": 5}}, "batch.scope.range.start"),
        ({"range": {"start": 1}}, "batch.scope.range.end"),
        ({"range": [1, 2]}, "batch.scope.range"),
        ({"cursor": ""}, "batch.scope.cursor"),
        ({"cursor": 7}, "batch.scope.cursor"),
        ({"partition_key": "p", "extra": 1}, "batch.scope.extra"),
        ("r", "batch.scope"),
    ],
)
def test_bad_scopes_are_refused_with_their_field(scope: Any, field: str) -> None:
    with pytest.raises(errors.ValidationFailed) as info:
        publish(scope)
    assert info.value.field == field


@pytest.mark.parametrize(
    ("batch", "field"),
    [
        ({"key": "b", "dataset": "d"}, "batch.object_key"),
        ({**BATCH, "rows": []}, "batch.rows"),
        ({"key": "b", "dataset": "d", "rows": [{}], "sha256": "0" * 64}, "batch.sha256"),
        ({"key": "b", "dataset": "d", "rows": [{}], "byte_size": 3}, "batch.byte_size"),
        ({"key": "b", "dataset": "d", "rows": [{}], "row_count": 2}, "batch.row_count"),
        ({"key": "b", "dataset": "d", "rows": [1]}, "batch.rows[0]"),
        ({"key": "b", "dataset": "d", "rows": [{}] * 1001}, "batch.rows"),
        ({k: v for k, v in BATCH.items() if k != "sha256"}, "batch.sha256"),
    ],
)
def test_a_batch_is_either_staged_or_inline(batch: dict[str, Any], field: str) -> None:
    with pytest.raises(errors.ValidationFailed) as info:
        wire.structure({**FENCE, "batch": batch}, wire.BufferPublishRequest)
    assert info.value.field == field


def test_inline_rows_alone_are_a_batch() -> None:
    req = wire.structure(
        {**FENCE, "batch": {"key": "b", "dataset": "d", "rows": [{"a": 1}], "row_count": 1}},
        wire.BufferPublishRequest,
    )
    assert req.batch.rows == [{"a": 1}] and req.batch.object_key is None


def test_good_scopes_and_none() -> None:
    assert publish(None).batch.scope is None
    assert wire.structure({**FENCE, "batch": BATCH}, wire.BufferPublishRequest).batch.scope is None
    got = publish({"range": {"start": 0, "end": 10}}).batch.scope
    assert got == wire.BufferScopeIn(range=wire.RangeIn(0, 10))


@pytest.mark.parametrize(
    ("doc", "scope"),
    [
        (None, None),
        ({"cursor": "c"}, Scope(cursor="c")),
        ({"partition_key": "p"}, Scope(partition_key="p")),
        ({"range": {"start": 3, "end": 9}}, Scope(range=(3, 9))),
    ],
)
def test_buffer_message_carries_the_scope_to_the_dedupe_key(doc: Any, scope: Scope | None) -> None:
    msg = BufferMessage("t", 1, "b", "d", "o", 1, 1, "0" * 64, scope=doc)
    back = BufferMessage.decode(msg.encode())
    assert back == msg and back.dedupe_scope() == scope


def test_a_message_from_before_scopes_decodes_without_one() -> None:
    old = b'{"task_id":"t","attempt":1,"batch_key":"b","dataset_uuid":"d","object_key":"o",'
    old += b'"row_count":1,"byte_size":1,"sha256":"x"}'
    assert BufferMessage.decode(old).scope is None
