"""``SqsQueue``: the Queue port on Amazon SQS (standard queue + dead-letter queue).

Theory of operation
-------------------

* **Bodies.** Trace sends ``{"task_id": ...}`` only. A body that is valid XML text goes to SQS
  as is; any other body (binary, or empty, which SQS refuses) is sent base64-encoded with the
  message attribute ``trace-body=base64``. A body over ``MAX_MESSAGE_BYTES`` raises
  ``PayloadTooLarge`` before anything is sent; so does an encoded body over SQS's own limit.
  Batches are split at 10 entries and at SQS's 256 KiB per-request limit.
* **Receipts.** The receipt handed out is ``"{received_ms}:{message_id}:{sqs_receipt_handle}"``:
  the receive time lets ``extend_visibility`` respect SQS's 12-hour ceiling (a message can stay
  hidden at most 43,200 s after the receive that hid it; an extension is clamped to what is
  left, and ``NotFound`` once nothing is left), the message id lets the adapter refuse stale
  receipts. SQS itself accepts *any* receipt a message ever had, so the port rule "only the
  latest receipt deletes or extends" is kept by a per-process registry of the latest receipt of
  each message received through any ``SqsQueue`` of this process. Across processes SQS cannot
  tell a stale receipt from a fresh one: a stale worker may delete a wake-up another worker
  holds. That is safe because wake-ups are hints (ADR 0006): the Dispatcher fences every
  attempt in Postgres and re-wakes queued tasks whose wake-up went missing.
* **Dead letters.** The queue has a redrive policy to ``{name}-dlq`` with ``maxReceiveCount``;
  SQS moves a message there on the receive after its last allowed one. ``dead_letter`` moves a
  received message there at once: it sends a copy to the DLQ with the message attribute
  ``trace-dead-reason``, then deletes the original. ``dead_letters`` peeks (visibility 0);
  ``redrive`` copies dead letters back as new messages (new id, receive count 1, no reason) and
  deletes them from the DLQ.
* **Timing.** SQS takes whole seconds: visibility timeouts, delays and long-poll waits are
  rounded up. Long polls use up to 20 s (``WaitTimeSeconds``).
* Every botocore error becomes a ``trace_core.errors`` class at this boundary.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import json
import math
import threading
import time
from collections.abc import Sequence
from typing import Any

from attrs import frozen

from trace_aws._boto import AwsCalls, client
from trace_core import errors
from trace_core.ports import ReceivedMessage
from trace_core.queue_args import check_bodies, dead_letter_reason

#: SQS limits (also the port's argument limits).
MAX_BATCH = 10
MAX_VISIBILITY_S = 43_200
MAX_WAIT_S = 20
MAX_DELAY_S = 900
#: SQS's limit on one message *and* on one SendMessageBatch request.
SQS_REQUEST_BYTES = 256 * 1024
#: Defaults: the SQS row of docs/standards/operations.md.
DEFAULT_VISIBILITY_S = 30
DEFAULT_MAX_RECEIVES = 5
DLQ_RETENTION_S = 14 * 24 * 3600

_ENC_ATTR = "trace-body"
_REASON_ATTR = "trace-dead-reason"
_REGISTRY_SIZE = 100_000


class _LatestReceipts:
    """message id → latest receipt handle seen in this process (bounded, thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._latest: collections.OrderedDict[tuple[str, str], str] = collections.OrderedDict()

    def record(self, queue_url: str, message_id: str, handle: str) -> None:
        with self._lock:
            key = (queue_url, message_id)
            self._latest[key] = handle
            self._latest.move_to_end(key)
            while len(self._latest) > _REGISTRY_SIZE:
                self._latest.popitem(last=False)

    def is_stale(self, queue_url: str, message_id: str, handle: str) -> bool:
        with self._lock:
            latest = self._latest.get((queue_url, message_id))
        return latest is not None and latest != handle

    def forget(self, queue_url: str, message_id: str, handle: str) -> None:
        with self._lock:
            if self._latest.get((queue_url, message_id)) == handle:
                self._latest[(queue_url, message_id)] = "<deleted>"


_RECEIPTS = _LatestReceipts()


def _xml_safe(text: str) -> bool:
    for ch in text:
        o = ord(ch)
        if not (
            o in (0x9, 0xA, 0xD)
            or 0x20 <= o <= 0xD7FF
            or 0xE000 <= o <= 0xFFFD
            or 0x10000 <= o <= 0x10FFFF
        ):
            return False
    return True


def encode_body(body: bytes) -> tuple[str, dict[str, Any]]:
    """The SQS message body and attributes for ``body``."""
    if body:
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        if text is not None and _xml_safe(text):
            return text, {}
    attrs = {_ENC_ATTR: {"DataType": "String", "StringValue": "base64"}}
    return "b64:" + base64.b64encode(body).decode("ascii"), attrs


def decode_body(message: dict[str, Any]) -> bytes:
    body = str(message.get("Body", ""))
    attrs = message.get("MessageAttributes") or {}
    if attrs.get(_ENC_ATTR, {}).get("StringValue") == "base64" and body.startswith("b64:"):
        return base64.b64decode(body[4:])
    return body.encode("utf-8")


def _entry_bytes(body: str, attrs: dict[str, Any]) -> int:
    size = len(body.encode("utf-8"))
    for name, value in attrs.items():
        size += len(name) + len(value["DataType"]) + len(value.get("StringValue", ""))
    return size


def _int_seconds(value: float, name: str, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise errors.ValidationFailed(f"{name} must be a number", field=name)
    if not 0 <= value <= hi:
        raise errors.ValidationFailed(f"{name} must be between 0 and {hi}", field=name)
    return min(hi, math.ceil(value))


def _parse_receipt(receipt: object) -> tuple[int, str, str] | None:
    if not isinstance(receipt, str):
        return None
    received_ms, sep, rest = receipt.partition(":")
    message_id, sep2, handle = rest.partition(":")
    if not (sep and sep2 and received_ms.isdigit() and message_id and handle):
        return None
    return int(received_ms), message_id, handle


@frozen
class QueueStats:
    """A queue's approximate backlog, as SQS counts it."""

    #: Messages not deleted and not dead (visible, in flight or delayed).
    depth: int
    #: Received and not yet deleted or visible again.
    in_flight: int
    #: Messages in the dead-letter queue.
    dead: int


class SqsQueue:
    """The Queue port on one SQS queue and its dead-letter queue.

    ``queue_url`` names the queue; the DLQ URL is read from its redrive policy on first use
    (or given). Use ``create`` to make both with Trace's settings (the SQS row of
    ``docs/standards/operations.md``).
    """

    def __init__(
        self,
        queue_url: str,
        *,
        sqs: Any | None = None,
        dlq_url: str | None = None,
        endpoint_url: str | None = None,
        region_name: str | None = None,
        clock_ms: Any = None,
    ) -> None:
        self.queue_url = queue_url
        self._sqs = sqs or client(
            "sqs", endpoint_url=endpoint_url, region_name=region_name, read_timeout=MAX_WAIT_S + 10
        )
        self._dlq_url = dlq_url
        self._calls = AwsCalls(name="trace-sqs")
        self._clock_ms = clock_ms or (lambda: int(time.time() * 1000))
        # One receive at a time per adapter: the worker has a single receive loop anyway, and
        # moto's receive is not atomic across concurrent requests (real SQS standard queues are
        # at-least-once too: a rare duplicate wake-up is harmless, claims are fenced).
        self._receiving: asyncio.Lock | None = None

    @property
    def name(self) -> str:
        """The queue's name (the last segment of its URL)."""
        return self.queue_url.rstrip("/").rsplit("/", 1)[-1]

    # -- provisioning -----------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        name: str,
        *,
        max_receives: int = DEFAULT_MAX_RECEIVES,
        visibility_s: int = DEFAULT_VISIBILITY_S,
        sqs: Any | None = None,
        endpoint_url: str | None = None,
        region_name: str | None = None,
    ) -> SqsQueue:
        """Create (or reuse) queue ``name`` and its DLQ ``{name}-dlq`` (blocking; for setup
        scripts and tests). Settings: long poll 20 s, visibility ``visibility_s``, redrive at
        ``max_receives``, DLQ retention 14 days. Raises a ``trace_core.errors`` class."""
        from trace_aws._boto import translate

        sqs = sqs or client(
            "sqs", endpoint_url=endpoint_url, region_name=region_name, read_timeout=MAX_WAIT_S + 10
        )
        try:
            dlq_url = sqs.create_queue(
                QueueName=f"{name}-dlq",
                Attributes={"MessageRetentionPeriod": str(DLQ_RETENTION_S)},
            )["QueueUrl"]
            dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])[
                "Attributes"
            ]["QueueArn"]
            url = sqs.create_queue(
                QueueName=name,
                Attributes={
                    "VisibilityTimeout": str(visibility_s),
                    "ReceiveMessageWaitTimeSeconds": str(MAX_WAIT_S),
                    "MaximumMessageSize": str(SQS_REQUEST_BYTES),
                    "RedrivePolicy": json.dumps(
                        {"deadLetterTargetArn": dlq_arn, "maxReceiveCount": str(max_receives)}
                    ),
                },
            )["QueueUrl"]
        except Exception as exc:
            raise translate(exc, "create queue") from exc
        return cls(url, sqs=sqs, dlq_url=dlq_url)

    @classmethod
    def lookup(
        cls,
        name: str,
        *,
        sqs: Any | None = None,
        endpoint_url: str | None = None,
        region_name: str | None = None,
    ) -> SqsQueue:
        """The existing queue ``name`` (blocking: one ``GetQueueUrl``); never creates it.
        Raises ``NotFound`` (no such queue), another ``trace_core.errors`` class."""
        from trace_aws._boto import translate

        sqs = sqs or client(
            "sqs", endpoint_url=endpoint_url, region_name=region_name, read_timeout=MAX_WAIT_S + 10
        )
        try:
            url = sqs.get_queue_url(QueueName=name)["QueueUrl"]
        except Exception as exc:
            raise translate(exc, f"queue {name}") from exc
        return cls(url, sqs=sqs)

    async def _dlq(self) -> str:
        if self._dlq_url is None:
            attrs = await self._calls.run(
                "get queue attributes",
                self._sqs.get_queue_attributes,
                QueueUrl=self.queue_url,
                AttributeNames=["RedrivePolicy"],
            )
            policy = attrs.get("Attributes", {}).get("RedrivePolicy")
            if not policy:
                raise errors.NotFound(f"queue {self.name} has no dead-letter queue")
            arn = json.loads(policy)["deadLetterTargetArn"]
            dlq_name = arn.rsplit(":", 1)[-1]
            self._dlq_url = (
                await self._calls.run("get dlq url", self._sqs.get_queue_url, QueueName=dlq_name)
            )["QueueUrl"]
        return self._dlq_url

    # -- the port ---------------------------------------------------------------------------

    async def send(self, bodies: Sequence[bytes], *, delay_seconds: int = 0) -> list[str]:
        """Send messages; returns their ids in order. Raises ``ValidationFailed``,
        ``PayloadTooLarge`` (nothing sent), ``Unavailable``."""
        return await self._send(self.queue_url, bodies, delay_seconds)

    async def _send(self, url: str, bodies: Sequence[bytes], delay_seconds: float) -> list[str]:
        checked = check_bodies(bodies)  # the same checks as every Queue adapter
        delay = _int_seconds(delay_seconds, "delay_seconds", MAX_DELAY_S)
        entries: list[tuple[str, dict[str, Any], int]] = []
        for i, body in enumerate(checked):
            text, attrs = encode_body(body)
            size = _entry_bytes(text, attrs)
            if size > SQS_REQUEST_BYTES:
                raise errors.PayloadTooLarge(
                    "encoded message exceeds SQS's 256 KiB limit (binary bodies are base64)",
                    field=f"bodies[{i}]",
                )
            entries.append((text, attrs, size))
        ids: list[str] = []
        batch: list[tuple[str, dict[str, Any], int]] = []
        for entry in entries:
            if batch and (
                len(batch) == MAX_BATCH or sum(e[2] for e in batch) + entry[2] > SQS_REQUEST_BYTES
            ):
                ids += await self._send_batch(url, batch, delay)
                batch = []
            batch.append(entry)
        if batch:
            ids += await self._send_batch(url, batch, delay)
        return ids

    async def _send_batch(
        self, url: str, batch: list[tuple[str, dict[str, Any], int]], delay: int
    ) -> list[str]:
        request = []
        for i, (text, attrs, _) in enumerate(batch):
            entry: dict[str, Any] = {"Id": str(i), "MessageBody": text, "DelaySeconds": delay}
            if attrs:
                entry["MessageAttributes"] = attrs
            request.append(entry)
        resp = await self._calls.run(
            "send messages", self._sqs.send_message_batch, QueueUrl=url, Entries=request
        )
        failed = resp.get("Failed") or []
        if failed:
            codes = sorted({f.get("Code", "?") for f in failed})
            raise errors.Unavailable(
                f"SQS refused {len(failed)} of {len(batch)} messages: {', '.join(codes)}"
            )
        by_id = {int(s["Id"]): s["MessageId"] for s in resp.get("Successful", [])}
        return [by_id[i] for i in range(len(batch))]

    async def receive(
        self,
        *,
        max_messages: int = 10,
        visibility_timeout: float = 30.0,
        wait_seconds: float = 0.0,
    ) -> list[ReceivedMessage]:
        """Receive up to ``max_messages`` (long poll up to ``wait_seconds``, max 20).
        Raises ``ValidationFailed``, ``Unavailable``."""
        if (
            isinstance(max_messages, bool)
            or not isinstance(max_messages, int)
            or not (1 <= max_messages <= MAX_BATCH)
        ):
            raise errors.ValidationFailed("max_messages must be 1..10", field="max_messages")
        visibility = _int_seconds(visibility_timeout, "visibility_timeout", MAX_VISIBILITY_S)
        wait = _int_seconds(wait_seconds, "wait_seconds", MAX_WAIT_S)
        return await self._receive(self.queue_url, max_messages, visibility, wait)

    async def _receive(
        self, url: str, max_messages: int, visibility: int, wait: int
    ) -> list[ReceivedMessage]:
        if self._receiving is None:
            self._receiving = asyncio.Lock()
        async with self._receiving:
            received_ms = self._clock_ms()
            resp = await self._calls.run(
                "receive messages",
                self._sqs.receive_message,
                QueueUrl=url,
                MaxNumberOfMessages=max_messages,
                VisibilityTimeout=visibility,
                WaitTimeSeconds=wait,
                MessageAttributeNames=[_ENC_ATTR, _REASON_ATTR],
                MessageSystemAttributeNames=["ApproximateReceiveCount"],
            )
        out = []
        for m in resp.get("Messages", []):
            _RECEIPTS.record(url, m["MessageId"], m["ReceiptHandle"])
            out.append(
                ReceivedMessage(
                    message_id=m["MessageId"],
                    body=decode_body(m),
                    receipt=f"{received_ms}:{m['MessageId']}:{m['ReceiptHandle']}",
                    receive_count=int(m.get("Attributes", {}).get("ApproximateReceiveCount", 1)),
                    dead_letter_reason=(m.get("MessageAttributes") or {})
                    .get(_REASON_ATTR, {})
                    .get("StringValue"),
                )
            )
        return out

    async def extend_visibility(self, receipt: str, visibility_timeout: float) -> None:
        """Hide the message ``visibility_timeout`` more seconds, clamped to SQS's 12-hour
        ceiling. Raises ``NotFound`` (stale, deleted or unknown receipt, or ceiling reached),
        ``ValidationFailed``, ``Unavailable``."""
        seconds = _int_seconds(visibility_timeout, "visibility_timeout", MAX_VISIBILITY_S)
        parsed = _parse_receipt(receipt)
        if parsed is None:
            raise errors.NotFound("unknown receipt", field="receipt")
        received_ms, message_id, handle = parsed
        if _RECEIPTS.is_stale(self.queue_url, message_id, handle):
            raise errors.NotFound(
                "stale receipt: the message was received again or deleted", field="receipt"
            )
        left = MAX_VISIBILITY_S - (self._clock_ms() - received_ms) // 1000 - 1
        if left <= 0:
            raise errors.NotFound(
                "the message reached SQS's 12-hour visibility ceiling", field="receipt"
            )
        await self._calls.run(
            "change message visibility",
            self._sqs.change_message_visibility,
            QueueUrl=self.queue_url,
            ReceiptHandle=handle,
            VisibilityTimeout=min(seconds, left),
        )

    async def delete(self, receipts: Sequence[str]) -> None:
        """Delete received messages; stale or unknown receipts are ignored.
        Raises ``Unavailable``."""
        await self._delete(self.queue_url, receipts)

    async def _delete(self, url: str, receipts: Sequence[str]) -> None:
        live: list[tuple[str, str]] = []
        for receipt in receipts:
            parsed = _parse_receipt(receipt)
            if parsed is None:
                continue
            _, message_id, handle = parsed
            if not _RECEIPTS.is_stale(url, message_id, handle):
                live.append((message_id, handle))
        for start in range(0, len(live), MAX_BATCH):
            chunk = live[start : start + MAX_BATCH]
            resp = await self._calls.run(
                "delete messages",
                self._sqs.delete_message_batch,
                QueueUrl=url,
                Entries=[{"Id": str(i), "ReceiptHandle": h} for i, (_, h) in enumerate(chunk)],
            )
            transient = [
                f
                for f in resp.get("Failed") or []
                if f.get("Code") not in ("ReceiptHandleIsInvalid", "InvalidParameterValue")
                and not f.get("SenderFault")
            ]
            if transient:
                raise errors.Unavailable(f"SQS failed to delete {len(transient)} messages")
            for message_id, handle in chunk:
                _RECEIPTS.forget(url, message_id, handle)

    async def dead_letter(self, letters: Sequence[tuple[ReceivedMessage, str]]) -> None:
        """Move received messages to the DLQ now: send each body there with its reason (message
        attribute ``trace-dead-reason``), then delete the originals. Stale receipts are ignored.
        Raises ``Unavailable`` (a message may then be in both queues: wake-ups are hints)."""
        live = []
        for message, reason in letters:
            parsed = _parse_receipt(message.receipt)
            if parsed is None or _RECEIPTS.is_stale(self.queue_url, parsed[1], parsed[2]):
                continue
            text, attrs = encode_body(message.body)
            attrs = {
                **attrs,
                _REASON_ATTR: {"DataType": "String", "StringValue": dead_letter_reason(reason)},
            }
            live.append((message.receipt, (text, attrs, _entry_bytes(text, attrs))))
        if not live:
            return
        dlq = await self._dlq()
        for start in range(0, len(live), MAX_BATCH):
            chunk = live[start : start + MAX_BATCH]
            await self._send_batch(dlq, [entry for _, entry in chunk], 0)
            await self._delete(self.queue_url, [receipt for receipt, _ in chunk])

    async def dead_letters(self, *, max_messages: int = 10) -> list[ReceivedMessage]:
        """Peek at up to ``max_messages`` dead letters (they stay visible). Raises
        ``NotFound`` (no DLQ configured), ``Unavailable``."""
        if not 1 <= max_messages <= MAX_BATCH:
            raise errors.ValidationFailed("max_messages must be 1..10", field="max_messages")
        return await self._receive(await self._dlq(), max_messages, 0, 0)

    async def delete_dead_letters(self, receipts: Sequence[str]) -> None:
        """Discard dead letters received through ``dead_letters``."""
        await self._delete(await self._dlq(), receipts)

    async def redrive(self, *, max_messages: int = 100) -> int:
        """Move up to ``max_messages`` dead letters back to the queue as new messages.
        Returns how many moved. Raises ``Unavailable``."""
        dlq = await self._dlq()
        moved = 0
        while moved < max_messages:
            batch = await self._receive(dlq, min(MAX_BATCH, max_messages - moved), 60, 0)
            if not batch:
                break
            await self._send(self.queue_url, [m.body for m in batch], 0)
            await self._delete(dlq, [m.receipt for m in batch])
            moved += len(batch)
        return moved

    async def depth(self) -> int:
        """Approximate number of visible + in-flight messages (for tests and metrics)."""
        resp = await self._calls.run(
            "get queue attributes",
            self._sqs.get_queue_attributes,
            QueueUrl=self.queue_url,
            AttributeNames=[
                "ApproximateNumberOfMessages",
                "ApproximateNumberOfMessagesNotVisible",
                "ApproximateNumberOfMessagesDelayed",
            ],
        )
        return sum(int(v) for v in resp.get("Attributes", {}).values())

    async def stats(self) -> QueueStats:
        """The queue's and its DLQ's approximate counts (SQS's attributes; SQS does not expose
        the oldest message's age as an attribute: CloudWatch's ``ApproximateAgeOfOldestMessage``
        has it). Raises ``NotFound`` (no DLQ), ``Unavailable``."""
        names = [
            "ApproximateNumberOfMessages",
            "ApproximateNumberOfMessagesNotVisible",
            "ApproximateNumberOfMessagesDelayed",
        ]
        live = await self._calls.run(
            "get queue attributes",
            self._sqs.get_queue_attributes,
            QueueUrl=self.queue_url,
            AttributeNames=names,
        )
        dead = await self._calls.run(
            "get dlq attributes",
            self._sqs.get_queue_attributes,
            QueueUrl=await self._dlq(),
            AttributeNames=names,
        )
        a = {k: int(v) for k, v in live.get("Attributes", {}).items()}
        return QueueStats(
            depth=sum(a.values()),
            in_flight=a.get("ApproximateNumberOfMessagesNotVisible", 0),
            dead=sum(int(v) for v in dead.get("Attributes", {}).values()),
        )

    async def purge_dead_letters(self) -> int:
        """Delete every dead letter; returns how many were deleted. Raises ``NotFound`` (no
        DLQ), ``Unavailable``."""
        dlq = await self._dlq()
        purged = 0
        while batch := await self._receive(dlq, MAX_BATCH, 60, 0):
            await self._delete(dlq, [m.receipt for m in batch])
            purged += len(batch)
        return purged

    async def close(self) -> None:
        self._calls.close()

    async def __aenter__(self) -> SqsQueue:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


__all__ = ["QueueStats", "SqsQueue", "decode_body", "encode_body"]
