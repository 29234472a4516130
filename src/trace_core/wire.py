"""Wire records of the task surfaces and the one converter that (de)serializes them.

Request records are strict: unknown fields, wrong JSON types (no ``"1"`` for an int, no
``true`` for an int) and out-of-range values are refused with a ``ValidationFailed`` naming the
field path (``events[0].key``). State machines never see JSON; servers and clients use
``structure`` / ``unstructure`` here.

The records are declared here; their field checks live in ``trace_core._wire_fields`` and the
converter (``structure``, ``unstructure``, ``canonical_digest``, re-exported here) in
``trace_core._wire_convert``.
"""

from __future__ import annotations

import uuid
from typing import Any, Literal

import attrs

from trace_core._wire_convert import canonical_digest, converter, structure, unstructure
from trace_core._wire_fields import (
    DATASET_RE,
    INT32_MAX,
    INT64_MAX,
    FieldError,
    between,
    dataset_name,
    dataset_names,
    event_key,
    hex64,
    length,
    lower_name,
    uuid_str,
)

#: The registry's rule for dataset and DAG names (read by ``trace_core.dag``).
_DATASET_RE = DATASET_RE

# --- /internal ------------------------------------------------------------------------------


@attrs.frozen
class ClaimRequest:
    task_id: str = attrs.field(validator=uuid_str)
    #: Who claims: shows in the attempt history and logs.
    worker_id: str = attrs.field(default="worker", validator=length(1, 200))


@attrs.frozen
class ClaimResponse:
    task_id: str
    attempt: int
    lease_token: str
    lease_expires_at: str
    capability_token: str
    heartbeat_interval_s: float


@attrs.frozen
class SlotOut:
    """The worker-pool slot an attempt leased (a DAG job with ``worker_pool``): its ``env``
    and the secret NAMES of its ``secret_env`` (in the org's namespace), never their values."""

    pool: str
    index: int
    env: dict[str, str] = attrs.field(factory=dict)
    secret_env: dict[str, str] = attrs.field(factory=dict)


@attrs.frozen
class TaskPayload:
    """What ``/internal/task-fetch`` returns (and each claim of a batch claim carries);
    ``LambdaInvokePayload`` extends it for Lambda invocations."""

    task_id: str
    org_id: str
    job_id: str | None
    operator: str
    payload: dict[str, Any]
    status: str
    attempt: int
    max_attempts: int
    timeout_s: int
    #: Where this attempt may stage its outputs in the ObjectStore.
    staging_prefix: str
    #: The worker-pool slot the attempt holds (None: the job uses no pool).
    slot: SlotOut | None = attrs.field(default=None, kw_only=True)


@attrs.frozen
class LambdaInvokePayload(TaskPayload):
    """What a ``runtime: lambda`` task's function is invoked with (``InvocationType=Event``):
    the ``/internal/task-fetch`` payload plus what the runner needs to act as the attempt."""

    #: The attempt's capability token, for ``/v1/task/*`` calls.
    capability_token: str
    #: The attempt's lease token (part of the fence of every ``/v1/task/*`` call).
    lease_token: str
    #: When the lease expires unless a heartbeat extends it (ISO 8601).
    lease_expires_at: str
    #: A presigned GET URL of the UDF bundle.
    bundle_url: str


def _uuid_list(_inst: object, attribute: attrs.Attribute[Any], value: list[str]) -> None:
    for i, item in enumerate(value):
        try:
            uuid.UUID(item)
        except (ValueError, AttributeError, TypeError):
            raise FieldError(
                f"{attribute.name}[{i}]", f"{attribute.name}[{i}] must be a UUID"
            ) from None


@attrs.frozen
class ClaimBatchRequest:
    """Claim several woken tasks in one transaction (the worker wrapper's batch path)."""

    task_ids: list[str] = attrs.field(validator=[length(1, 100), _uuid_list])
    worker_id: str = attrs.field(default="worker", validator=length(1, 200))


@attrs.frozen
class ClaimGrantOut:
    """One started attempt with its task payload (claim and fetch in one answer)."""

    claim: ClaimResponse
    task: TaskPayload


@attrs.frozen
class ClaimRefusal:
    task_id: str
    #: The error code a single claim would have returned (``task_not_claimable``, ...).
    error: str
    message: str


@attrs.frozen
class ClaimBatchResponse:
    claims: list[ClaimGrantOut]
    refused: list[ClaimRefusal]


# --- /v1/task --------------------------------------------------------------------------------


@attrs.frozen
class FenceFields:
    task_id: str = attrs.field(validator=uuid_str)
    attempt: int = attrs.field(validator=between(1, INT32_MAX))
    lease_token: str = attrs.field(validator=uuid_str)


@attrs.frozen
class EventIn:
    #: Producer-chosen idempotency key, unique per task: re-emitting a key is a no-op.
    key: str = attrs.field(validator=event_key)
    type: str = attrs.field(validator=lower_name)
    payload: dict[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class HeartbeatRequest(FenceFields):
    pass


@attrs.frozen
class HeartbeatResponse:
    lease_expires_at: str
    capability_token: str


@attrs.frozen
class EventsRequest(FenceFields):
    events: list[EventIn] = attrs.field(factory=list, validator=length(0, 1000))


@attrs.frozen
class EventsResponse:
    accepted: int
    duplicates: int


@attrs.frozen
class RangeIn:
    """A half-open block range ``[start, end)``."""

    start: int = attrs.field(validator=between(0, INT64_MAX))
    end: int = attrs.field(validator=between(1, INT64_MAX))

    def __attrs_post_init__(self) -> None:
        if self.end <= self.start:
            raise FieldError("end", "end must be greater than start")


def _one_scope(inst: BufferScopeIn, _attribute: attrs.Attribute[Any], _value: Any) -> None:
    given = [n for n in ("cursor", "partition_key", "range") if getattr(inst, n) is not None]
    if len(given) != 1:
        raise FieldError(
            given[1] if len(given) > 1 else "cursor",
            "give exactly one of cursor, partition_key or range",
        )


@attrs.frozen
class BufferScopeIn:
    """What a buffer batch covers: exactly one of a cursor, a partition key or a block range.
    Part of every row's dedupe key (``trace_core.sink.Scope``)."""

    cursor: str | None = attrs.field(
        default=None, validator=attrs.validators.optional(length(1, 1024))
    )
    partition_key: str | None = attrs.field(
        default=None, validator=attrs.validators.optional(length(1, 1024))
    )
    range: RangeIn | None = attrs.field(default=None, validator=_one_scope)


#: Most bytes of inline rows (as JSON lines): a buffer message must fit one queue message
#: (256 KiB on SQS) with its pointer fields.
INLINE_MAX_BYTES = 240 * 1024


def _one_source(inst: BufferBatchIn, _attribute: attrs.Attribute[Any], rows: Any) -> None:
    if rows is None:
        for name in ("object_key", "row_count", "byte_size", "sha256"):
            if getattr(inst, name) is None:
                raise FieldError(name, f"{name} is required for a staged batch (no rows)")
        return
    if inst.object_key is not None:
        raise FieldError("rows", "give either object_key or rows, not both")
    for name in ("byte_size", "sha256"):
        if getattr(inst, name) is not None:
            raise FieldError(name, f"{name} is computed for inline rows; leave it out")
    if inst.row_count is not None and inst.row_count != len(rows):
        raise FieldError("row_count", f"row_count is {inst.row_count}, rows holds {len(rows)}")


@attrs.frozen
class BufferBatchIn:
    """A batch of rows for a buffered dataset: a staged JSON-lines object (``object_key``,
    ``row_count``, ``byte_size``, ``sha256``) or the rows inline (``rows``)."""

    key: str = attrs.field(validator=event_key)
    dataset: str = attrs.field(validator=lower_name)
    object_key: str | None = attrs.field(
        default=None, validator=attrs.validators.optional(length(1, 1024))
    )
    row_count: int | None = attrs.field(
        default=None, validator=attrs.validators.optional(between(0, INT32_MAX))
    )
    byte_size: int | None = attrs.field(
        default=None, validator=attrs.validators.optional(between(0, INT64_MAX))
    )
    sha256: str | None = attrs.field(default=None, validator=attrs.validators.optional(hex64))
    scope: BufferScopeIn | None = None
    rows: list[dict[str, Any]] | None = attrs.field(
        default=None,
        validator=[attrs.validators.optional(length(0, 1000)), _one_source],
    )


@attrs.frozen
class BufferPublishRequest(FenceFields):
    batch: BufferBatchIn


@attrs.frozen
class BufferPublishResponse:
    accepted: bool
    duplicate: bool


@attrs.frozen
class PartitionIn:
    """A block range ``[start, end)`` or a partition ``key`` (exactly one of the two)."""

    start: int | None = attrs.field(
        default=None, validator=attrs.validators.optional(between(0, INT64_MAX))
    )
    end: int | None = attrs.field(
        default=None, validator=attrs.validators.optional(between(1, INT64_MAX))
    )
    key: str | None = attrs.field(default=None, validator=attrs.validators.optional(event_key))


@attrs.frozen
class OutputIn:
    """One staged object of the output manifest (``trace_core.commit``)."""

    dataset: str = attrs.field(validator=dataset_name)
    #: Where the attempt staged the object: inside its staging prefix.
    object_key: str = attrs.field(validator=length(1, 1024))
    size: int = attrs.field(validator=between(0, INT64_MAX))
    sha256: str = attrs.field(validator=hex64)
    partition: PartitionIn
    #: Target dataset version (UUID); default: the dataset's active version.
    version: str | None = attrs.field(default=None, validator=attrs.validators.optional(uuid_str))


@attrs.frozen
class CompleteRequest(FenceFields):
    outcome: Literal["succeeded", "failed", "canceled"] = "succeeded"
    retryable: bool = True
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    final_events: list[EventIn] = attrs.field(factory=list, validator=length(0, 1000))
    #: The output manifest, committed atomically with a successful completion.
    outputs: list[OutputIn] = attrs.field(factory=list, validator=length(0, 10_000))


@attrs.frozen
class TokenedCompletion:
    """One completion in a batch, with the capability token of its attempt."""

    capability_token: str = attrs.field(validator=length(1, 8192))
    completion: CompleteRequest


@attrs.frozen
class CompleteBatchRequest:
    """Completions a platform worker wrapper sends together (``/internal/task-complete-batch``):
    each is authorised by its own attempt's token and fenced like ``/v1/task/complete``."""

    completions: list[TokenedCompletion] = attrs.field(validator=length(1, 500))


@attrs.frozen
class CompleteBatchItem:
    """The outcome of one completion of a batch: its new state, or the error it got."""

    task_id: str
    attempt: int
    state: str | None
    replay: bool
    error: str | None
    message: str | None


@attrs.frozen
class CompleteBatchResponse:
    results: list[CompleteBatchItem]


@attrs.frozen
class TaskResolveRequest(FenceFields):
    """Resolve datasets for the attempt: only those its capability token grants."""

    datasets: list[str] = attrs.field(validator=[length(1, 100), dataset_names])
    pin_ttl_s: float = attrs.field(default=300.0, validator=between(0.0, 86_400.0))


@attrs.frozen
class CompleteResponse:
    task_id: str
    attempt: int
    state: str
    replay: bool


@attrs.frozen
class CredentialsRequest(FenceFields):
    #: Narrow the reads to these prefixes (each inside the attempt's grant); default: all.
    read_prefixes: list[str] | None = attrs.field(
        default=None, validator=attrs.validators.optional(length(0, 100))
    )


@attrs.frozen
class CredentialsResponse:
    """Temporary S3 credentials scoped to one attempt (AWS profile only)."""

    access_key_id: str
    secret_access_key: str
    session_token: str
    #: When the credentials expire (ISO 8601).
    expiration: str
    region: str
    bucket: str
    #: Key prefixes the credentials may read.
    read_prefixes: list[str]
    #: The one key prefix the credentials may write (the attempt's staging prefix).
    write_prefix: str


# --- admin -----------------------------------------------------------------------------------


@attrs.frozen
class CreateTaskRequest:
    operator: str = attrs.field(validator=lower_name)
    org: str = attrs.field(default="default", validator=lower_name)
    payload: dict[str, Any] = attrs.field(factory=dict)
    max_attempts: int = attrs.field(default=5, validator=between(1, 100))
    timeout_s: int = attrs.field(default=60, validator=between(1, 900))
    delay_s: float = attrs.field(default=0.0, validator=between(0.0, 86_400.0))
    idempotency_key: str | None = attrs.field(
        default=None, validator=attrs.validators.optional(event_key)
    )
    #: Where the task runs: a platform worker (woken through the queue) or Lambda (invoked by
    #: the Dispatcher with the full payload).
    runtime: Literal["worker", "lambda"] = "worker"
    #: Datasets (names in the task's org) the task may read: its capability token grants them.
    read_datasets: list[str] = attrs.field(factory=list, validator=[length(0, 100), dataset_names])


@attrs.frozen
class CreateTasksRequest:
    tasks: list[CreateTaskRequest] = attrs.field(validator=length(1, 10_000))


@attrs.frozen
class TaskInfo:
    task_id: str
    org_id: str
    operator: str
    state: str
    attempt: int
    max_attempts: int
    created: bool = True


# --- user API (/v1/orgs/{org}/...) ----------------------------------------------------------


def _non_empty_strings(_inst: object, attribute: attrs.Attribute[Any], value: list[str]) -> None:
    for i, item in enumerate(value):
        if not 1 <= len(item) <= 200:
            raise FieldError(
                f"{attribute.name}[{i}]", f"{attribute.name}[{i}] must have 1 to 200 characters"
            )


def _version_pointers(
    _inst: object, attribute: attrs.Attribute[Any], value: dict[str, str]
) -> None:
    for name, version in value.items():
        if not DATASET_RE.match(name):
            raise FieldError(attribute.name, f"dataset names must match {DATASET_RE.pattern}")
        try:
            uuid.UUID(version)
        except (ValueError, AttributeError, TypeError):
            raise FieldError(f"{attribute.name}.{name}", "versions must be UUIDs") from None


@attrs.frozen
class ResolveRequest:
    """Pin dataset names of the org to their active versions."""

    datasets: list[str] = attrs.field(validator=[length(1, 1000), _non_empty_strings])
    pin_ttl_s: float = attrs.field(default=300.0, validator=between(0.0, 86_400.0))


@attrs.frozen
class ReadRolesRequest:
    """The org roles that may read a dataset (replaces the list)."""

    read_roles: list[str] = attrs.field(validator=[length(0, 1000), _non_empty_strings])


@attrs.frozen
class CutoverRequest:
    """Point a DAG's datasets at new versions in one generation."""

    pointers: dict[str, str] = attrs.field(validator=[length(1, 1000), _version_pointers])


@attrs.frozen
class DagDeployRequest:
    """A DAG file's plain document (its YAML or JSON, parsed), checked by
    ``trace_core.dag.validate`` at deploy."""

    spec: dict[str, Any]


@attrs.frozen
class DagTriggerRequest:
    """Run a source job of a DAG's active version by hand."""

    #: Merged over the job's ``config`` into the task's payload.
    payload: dict[str, Any] = attrs.field(factory=dict)
    #: The run's durable id: triggering the same run again answers its existing task.
    run_id: str | None = attrs.field(default=None, validator=attrs.validators.optional(event_key))


@attrs.frozen
class DagInvalidateRequest:
    """Rerun the DAG tasks that read a replaced block range ``[start, end)`` or partition
    ``key`` of a dataset (``trace_lite.dag_invalidations``)."""

    start: int | None = attrs.field(
        default=None, validator=attrs.validators.optional(between(0, INT64_MAX))
    )
    end: int | None = attrs.field(
        default=None, validator=attrs.validators.optional(between(1, INT64_MAX))
    )
    key: str | None = attrs.field(default=None, validator=attrs.validators.optional(event_key))
    #: The dataset version (default: the producing DAG's active one).
    version: str | None = attrs.field(default=None, validator=attrs.validators.optional(uuid_str))


@attrs.frozen
class MemberRequest:
    """A member's roles in the org (replaces the list)."""

    roles: list[str] = attrs.field(validator=[length(0, 1000), _non_empty_strings])


__all__ = [
    "INT32_MAX",
    "INT64_MAX",
    "BufferBatchIn",
    "BufferPublishRequest",
    "BufferPublishResponse",
    "BufferScopeIn",
    "ClaimBatchRequest",
    "ClaimBatchResponse",
    "ClaimGrantOut",
    "ClaimRefusal",
    "ClaimRequest",
    "ClaimResponse",
    "CompleteBatchItem",
    "CompleteBatchRequest",
    "CompleteBatchResponse",
    "CompleteRequest",
    "CompleteResponse",
    "CreateTaskRequest",
    "CreateTasksRequest",
    "CredentialsRequest",
    "CredentialsResponse",
    "CutoverRequest",
    "DagDeployRequest",
    "DagInvalidateRequest",
    "DagTriggerRequest",
    "EventIn",
    "EventsRequest",
    "EventsResponse",
    "FenceFields",
    "FieldError",
    "HeartbeatRequest",
    "HeartbeatResponse",
    "LambdaInvokePayload",
    "MemberRequest",
    "OutputIn",
    "PartitionIn",
    "RangeIn",
    "ReadRolesRequest",
    "ResolveRequest",
    "SlotOut",
    "TaskInfo",
    "TaskPayload",
    "TaskResolveRequest",
    "TokenedCompletion",
    "canonical_digest",
    "converter",
    "structure",
    "unstructure",
]
