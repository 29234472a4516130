"""Ports: the seams between the kernel and the outside world.

Each port is a ``typing.Protocol`` shaped around Trace's domain, not around a technology.
Every adapter (memory in ``trace_core.testing``, Lite in ``trace_lite``, AWS in ``trace_aws``)
runs the same conformance suite in ``trace_core.testing.conformance``.

All methods are ``async``. Adapters raise only ``trace_core.errors`` classes; every method
documents which.

Invariants every Queue adapter keeps:

* a message body is opaque bytes of at most ``max_message_bytes`` (256 KiB); Trace sends
  ``{"task_id": ...}`` only;
* a received message is invisible to other receivers until its visibility timeout passes;
* every receive increments ``receive_count`` and yields a fresh ``receipt``; only the latest
  receipt can delete or extend the message (a stale receipt is a no-op / ``NotFound``);
* a message received ``max_receives`` times and not deleted moves to the dead-letter queue
  instead of being delivered again;
* a received message the receiver cannot use (a poison message) can be moved to the
  dead-letter queue at once with ``dead_letter``, its reason kept with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import attrs

from trace_core import errors, wire

#: Queue message size limit, the same in both backends (SQS's limit).
MAX_MESSAGE_BYTES = 256 * 1024
#: Longest dead-letter reason kept (``Queue.dead_letter`` truncates longer ones).
MAX_DEAD_LETTER_REASON = 1000


@attrs.frozen
class ReceivedMessage:
    """A message handed to one receiver until its visibility timeout passes."""

    #: Adapter-assigned message id, stable across receives.
    message_id: str
    #: The message body as sent.
    body: bytes
    #: Opaque handle for this receive; needed to delete or extend the message.
    receipt: str
    #: How many times the message has been received, this receive included (1 on the first).
    receive_count: int
    #: For a dead letter moved by ``Queue.dead_letter``: the reason given; otherwise None
    #: (also for a message dead-lettered after ``max_receives``).
    dead_letter_reason: str | None = None


@runtime_checkable
class Queue(Protocol):
    """A work queue that only wakes workers: durable state lives elsewhere."""

    @property
    def name(self) -> str:
        """The queue's name."""
        ...

    async def send(self, bodies: Sequence[bytes], *, delay_seconds: int = 0) -> list[str]:
        """Send messages; returns their message ids in order.

        Raises ``PayloadTooLarge`` if any body exceeds ``MAX_MESSAGE_BYTES`` (nothing is sent),
        ``Unavailable`` on a transient backend failure.
        """
        ...

    async def receive(
        self,
        *,
        max_messages: int = 10,
        visibility_timeout: float = 30.0,
        wait_seconds: float = 0.0,
    ) -> list[ReceivedMessage]:
        """Receive up to ``max_messages`` visible messages, hiding them for ``visibility_timeout``.

        Waits up to ``wait_seconds`` for at least one message (long poll). Messages whose
        receive count would exceed the dead-letter threshold move to the DLQ instead.
        Raises ``Unavailable``.
        """
        ...

    async def extend_visibility(self, receipt: str, visibility_timeout: float) -> None:
        """Hide the message for ``visibility_timeout`` more seconds from now.

        Raises ``NotFound`` if the receipt is stale (message deleted or received again).
        """
        ...

    async def delete(self, receipts: Sequence[str]) -> None:
        """Delete received messages. Stale receipts are ignored. Raises ``Unavailable``."""
        ...

    async def dead_letter(self, letters: Sequence[tuple[ReceivedMessage, str]]) -> None:
        """Move received messages to the dead-letter queue now, each with its reason
        (``(message, reason)``; the reason is truncated to ``MAX_DEAD_LETTER_REASON``
        characters). A stale receipt is ignored. Raises ``Unavailable``.
        """
        ...

    async def dead_letters(self, *, max_messages: int = 10) -> list[ReceivedMessage]:
        """Receive from this queue's dead-letter queue (for inspection and replay); each
        carries the ``dead_letter_reason`` it was moved with."""
        ...

    async def redrive(self, *, max_messages: int = 100) -> int:
        """Move up to ``max_messages`` dead letters back to the queue; returns how many moved."""
        ...


@attrs.frozen
class ObjectInfo:
    """Metadata of a stored object."""

    key: str
    size: int
    #: Hex SHA-256 of the content.
    sha256: str


@runtime_checkable
class ObjectStore(Protocol):
    """Blob storage for dataset partitions, buffer batches, bundles and exports.

    Keys are relative POSIX-style paths (``org/{org_id}/dataset/...``). Every method that takes
    a key raises ``UnsafeKey`` for an absolute key, a ``..`` or ``.`` segment, an empty segment,
    a backslash, a NUL or other control character, or a percent-encoded form of any of these.
    """

    async def put(self, key: str, data: bytes) -> ObjectInfo:
        """Store ``data`` under ``key`` (overwrites). Raises ``UnsafeKey``, ``Unavailable``."""
        ...

    async def get(self, key: str) -> bytes:
        """Return the object's content. Raises ``NotFound``, ``UnsafeKey``, ``Unavailable``."""
        ...

    async def head(self, key: str) -> ObjectInfo:
        """Return the object's metadata. Raises ``NotFound``, ``UnsafeKey``, ``Unavailable``."""
        ...

    async def list(self, prefix: str) -> list[ObjectInfo]:
        """List objects whose key starts with ``prefix``, sorted by key. Raises ``UnsafeKey``."""
        ...

    async def delete(self, key: str) -> None:
        """Delete the object; deleting a missing key is not an error. Raises ``UnsafeKey``."""
        ...

    async def signed_url(self, key: str, *, method: str, expires_in: int) -> str:
        """A URL that allows ``method`` (``GET`` or ``PUT``) on ``key`` for ``expires_in`` seconds.

        Raises ``UnsafeKey``, ``ValidationFailed`` for another method or a non-positive expiry.
        """
        ...


@attrs.frozen
class PublicKey:
    """A verification key the Signer publishes."""

    #: Key id, carried in the JWT ``kid`` header.
    kid: str
    #: The JWS algorithm pinned to this key (``EdDSA`` or ``ES256``); never read from a token.
    algorithm: str
    #: The public key in PEM (SubjectPublicKeyInfo).
    public_pem: bytes


@runtime_checkable
class Signer(Protocol):
    """Signs capability tokens with the current key; publishes current and next public keys."""

    async def sign(self, signing_input: bytes) -> tuple[str, str, bytes]:
        """Sign with the current key; returns ``(kid, algorithm, signature)``.

        The signature is in JWS form (raw ``r||s`` for ECDSA). Raises ``SignerError``.
        """
        ...

    async def public_keys(self) -> list[PublicKey]:
        """Current and next verification keys (and retired ones still inside their grace)."""
        ...

    async def verify(self, kid: str, signing_input: bytes, signature: bytes) -> bool:
        """Whether ``signature`` over ``signing_input`` verifies with key ``kid``.

        Returns False for an unknown kid or a bad signature; never raises for bad input.
        """
        ...


@runtime_checkable
class SecretStore(Protocol):
    """Named secret values in two namespaces (``trace_core.secret_names``): platform secrets
    (``trace/platform/...``) and org secrets (``trace/org/{org_id}/...``).

    Every method validates names first and raises ``ValidationFailed`` (``field="name"`` or
    ``"prefix"``) for a name outside both namespaces.
    """

    async def put(self, name: str, value: bytes) -> None:
        """Store ``value`` (at most 64 KiB) under ``name`` (overwrites).
        Raises ``ValidationFailed``, ``PayloadTooLarge``, ``Unavailable``."""
        ...

    async def get(self, name: str) -> bytes:
        """The current value. Raises ``NotFound``, ``ValidationFailed``, ``Unavailable``."""
        ...

    async def delete(self, name: str) -> None:
        """Delete the secret (a missing one is fine). Raises ``ValidationFailed``,
        ``Unavailable``."""
        ...

    async def list(self, prefix: str) -> list[str]:
        """Names under ``prefix`` (ending in ``/``), sorted. Raises ``ValidationFailed``,
        ``Unavailable``."""
        ...


@runtime_checkable
class TaskSurface(Protocol):
    """What a worker calls on the Dispatcher: claim, fetch, heartbeat, events, buffer publish,
    complete. Wire records in and out; errors are ``trace_core.errors`` classes.

    Implemented by the in-process Dispatcher (``trace_lite.task_surface.InProcessTaskSurface``),
    by the HTTP client (``trace_sdk.DispatcherClient``) and, for tests, by
    ``trace_core.testing.FakeTaskSurface``. The calls that act for one attempt carry that
    attempt's capability token and its fence (``task_id``, ``attempt``, ``lease_token``); every
    one of them is idempotent (fenced by state and keys), so a caller may retry it.

    Errors every method may raise: ``Unavailable`` (transient; retry), ``InvalidRequest``
    subclasses (a bug in the caller). Attempt calls also raise ``Unauthenticated`` (bad token),
    ``Forbidden`` (a token of another task or attempt), ``LeaseLost`` (the fence is stale),
    ``TaskCanceled`` and ``NotFound``.
    """

    async def claim_many(self, task_ids: Sequence[str], worker_id: str) -> wire.ClaimBatchResponse:
        """Claim each task that is waiting; the answer carries a grant (claim and payload) per
        claimed task and a refusal (``error`` code, message) per other one. Raises
        ``ValidationFailed`` when a task id is not a UUID (nothing is claimed)."""
        ...

    async def fetch(self, task_id: str, attempt: int | None = None) -> wire.TaskPayload:
        """The task as seen by ``attempt`` (the current one when None). Raises ``NotFound``."""
        ...

    async def heartbeat(
        self, capability_token: str, req: wire.HeartbeatRequest
    ) -> wire.HeartbeatResponse:
        """Extend the lease; the answer carries a renewed capability token."""
        ...

    async def events(self, capability_token: str, req: wire.EventsRequest) -> wire.EventsResponse:
        """Record events now (keys dedupe across attempts)."""
        ...

    async def buffer_publish(
        self, capability_token: str, req: wire.BufferPublishRequest
    ) -> wire.BufferPublishResponse:
        """Publish a buffer batch pointer (its object is already written)."""
        ...

    async def complete(
        self, capability_token: str, req: wire.CompleteRequest
    ) -> wire.CompleteResponse:
        """End the attempt with its outcome (a repeated identical call is a replay)."""
        ...

    async def complete_batch(
        self, items: Sequence[wire.TokenedCompletion]
    ) -> list[wire.CompleteResponse | errors.TraceError]:
        """Complete several attempts, each with its own token; one result per item, in order:
        its response, or the error that item alone got. Raises only when the whole call
        failed (``Unavailable``)."""
        ...


#: Largest secret value (Secrets Manager's limit).
MAX_SECRET_BYTES = 64 * 1024


__all__ = [
    "MAX_DEAD_LETTER_REASON",
    "MAX_MESSAGE_BYTES",
    "MAX_SECRET_BYTES",
    "ObjectInfo",
    "ObjectStore",
    "PublicKey",
    "Queue",
    "ReceivedMessage",
    "SecretStore",
    "Signer",
    "TaskSurface",
]
