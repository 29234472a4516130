"""The Queue conformance suite on ``SqsQueue`` against a moto server over real HTTP, plus what
is specific to SQS: the 12-hour visibility ceiling, the size limit on encoded bodies, errors.

Time is real: SQS visibility timeouts and delays cannot be shifted like Postgres rows, so the
``queue`` fixture is an ``SqsQueue`` whose visibility timeouts and delays are divided by
``SCALE`` before they reach SQS, and ``advance(s)`` sleeps ``s / SCALE`` (+ a small margin for
moto's millisecond clock). The suite's 30 s timeouts become 3 s real ones.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest

from trace_aws._boto import client
from trace_aws.sqs_queue import SqsQueue
from trace_core import errors
from trace_core.ports import MAX_MESSAGE_BYTES, ReceivedMessage
from trace_core.testing.conformance.queue import MAX_RECEIVES, Advance, QueueConformance

SCALE = 10.0
MARGIN_S = 0.15


class ScaledSqsQueue(SqsQueue):
    """An SqsQueue whose port seconds are ``1/SCALE`` real seconds (visibility and delay)."""

    async def receive(
        self, *, max_messages: int = 10, visibility_timeout: float = 30.0, wait_seconds: float = 0.0
    ) -> list[ReceivedMessage]:
        if isinstance(visibility_timeout, int | float) and 0 < visibility_timeout <= 43_200:
            visibility_timeout = max(1, math.ceil(visibility_timeout / SCALE))
        return await super().receive(
            max_messages=max_messages,
            visibility_timeout=visibility_timeout,
            wait_seconds=wait_seconds,
        )

    async def extend_visibility(self, receipt: str, visibility_timeout: float) -> None:
        await super().extend_visibility(receipt, max(1, math.ceil(visibility_timeout / SCALE)))

    async def send(self, bodies: Sequence[bytes], *, delay_seconds: int = 0) -> list[str]:
        if isinstance(delay_seconds, int) and 0 < delay_seconds <= 900:
            delay_seconds = max(1, math.ceil(delay_seconds / SCALE))
        return await super().send(bodies, delay_seconds=delay_seconds)


@pytest.fixture(scope="module")
def sqs(moto_server: Any) -> Any:
    return client("sqs", endpoint_url=moto_server.url)


@pytest.fixture
async def queue(sqs: Any) -> AsyncIterator[SqsQueue]:
    name = f"tasks-{uuid.uuid4().hex[:10]}"
    plain = await asyncio.to_thread(SqsQueue.create, name, max_receives=MAX_RECEIVES, sqs=sqs)
    q = ScaledSqsQueue(plain.queue_url, sqs=sqs, dlq_url=plain._dlq_url)
    yield q
    await q.close()
    await plain.close()


@pytest.fixture
def advance() -> Advance:
    async def advance(seconds: float) -> None:
        await asyncio.sleep(seconds / SCALE + MARGIN_S)

    return advance


class TestSqsQueue(QueueConformance):
    pass


# -- SQS specifics -----------------------------------------------------------------------------


@pytest.fixture
async def plain_queue(sqs: Any) -> AsyncIterator[SqsQueue]:
    q = await asyncio.to_thread(SqsQueue.create, f"plain-{uuid.uuid4().hex[:10]}", sqs=sqs)
    yield q
    await q.close()


async def test_create_sets_the_brief_settings(plain_queue: SqsQueue, sqs: Any) -> None:
    attrs = sqs.get_queue_attributes(QueueUrl=plain_queue.queue_url, AttributeNames=["All"])[
        "Attributes"
    ]
    assert attrs["ReceiveMessageWaitTimeSeconds"] == "20"
    assert attrs["VisibilityTimeout"] == "30"
    import json

    redrive = json.loads(attrs["RedrivePolicy"])
    assert int(redrive["maxReceiveCount"]) == 5
    assert redrive["deadLetterTargetArn"].endswith(f"{plain_queue.name}-dlq")
    dlq = sqs.get_queue_attributes(
        QueueUrl=await plain_queue._dlq(), AttributeNames=["MessageRetentionPeriod"]
    )["Attributes"]
    assert dlq["MessageRetentionPeriod"] == str(14 * 24 * 3600)


async def test_dlq_is_discovered_from_the_redrive_policy(plain_queue: SqsQueue, sqs: Any) -> None:
    fresh = SqsQueue(plain_queue.queue_url, sqs=sqs)
    assert await fresh._dlq() == plain_queue._dlq_url
    await fresh.close()


async def test_task_wakeups_are_plain_json_text(plain_queue: SqsQueue, sqs: Any) -> None:
    body = b'{"task_id": "5f0c0a34-7f8e-4d0e-9f0e-3b8f0b7c2a11"}'
    await plain_queue.send([body])
    raw = sqs.receive_message(QueueUrl=plain_queue.queue_url, MessageAttributeNames=["All"])
    [msg] = raw["Messages"]
    assert msg["Body"] == body.decode()
    assert "MessageAttributes" not in msg


async def test_encoded_binary_over_the_sqs_limit_is_refused(plain_queue: SqsQueue) -> None:
    with pytest.raises(errors.PayloadTooLarge):
        await plain_queue.send([b"ok", b"\xff" * (MAX_MESSAGE_BYTES - 10)])
    assert await plain_queue.receive() == []


async def test_large_batches_are_split_by_size(plain_queue: SqsQueue) -> None:
    bodies = [bytes([65 + i]) * (100 * 1024) for i in range(5)]  # 500 KiB in all
    ids = await plain_queue.send(bodies)
    assert len(ids) == 5
    got: list[ReceivedMessage] = []
    while batch := await plain_queue.receive(max_messages=10):
        got += batch
    assert sorted(m.body for m in got) == sorted(bodies)


async def test_visibility_ceiling_clamps_then_refuses(sqs: Any) -> None:
    name = f"ceiling-{uuid.uuid4().hex[:8]}"
    base = await asyncio.to_thread(SqsQueue.create, name, sqs=sqs)
    now_ms = [1_000_000_000_000]
    q = SqsQueue(base.queue_url, sqs=sqs, clock_ms=lambda: now_ms[0])
    await q.send([b"x"])
    [msg] = await q.receive(visibility_timeout=30)
    now_ms[0] += (43_200 - 100) * 1000  # 11 h 58 m later: 99 s are left
    calls: list[dict[str, Any]] = []
    sqs.meta.events.register(
        "provide-client-params.sqs.ChangeMessageVisibility",
        lambda params, **_: calls.append(dict(params)),
    )
    await q.extend_visibility(msg.receipt, 600)
    assert calls[-1]["VisibilityTimeout"] == 99
    now_ms[0] += 100 * 1000
    with pytest.raises(errors.NotFound):
        await q.extend_visibility(msg.receipt, 600)
    await q.close()
    await base.close()


async def test_missing_queue_and_dead_endpoint_are_trace_errors(moto_server: Any) -> None:
    q = SqsQueue(f"{moto_server.url}/123456789012/no-such-queue", endpoint_url=moto_server.url)
    with pytest.raises(errors.TraceError):
        await q.send([b"x"])
    await q.close()
    dead = SqsQueue("http://127.0.0.1:9/123456789012/q", endpoint_url="http://127.0.0.1:9")
    dead._sqs.meta.config.retries = {"max_attempts": 0}
    with pytest.raises(errors.Unavailable):
        await dead.receive()
    await dead.close()
