"""Profile selection: the one place that chooses Lite or AWS adapters for every process.

``TRACE_PROFILE=lite`` (default) or ``aws``. Nothing else in Trace branches on the profile: the
CLI asks this module for a Dispatcher's or a worker's adapters and gets objects that implement
the ports. The AWS adapters (and boto3) are imported only when the AWS profile is selected, so a
Lite install never imports boto3.

AWS profile environment (Postgres stays ``TRACE_DATABASE_URL``):

==================================  =========================================================
``TRACE_AWS_ENDPOINT_URL``          one endpoint for every AWS service (moto, LocalStack)
``TRACE_SQS_QUEUE_URL``             the task wake-up queue (its DLQ comes from its redrive)
``TRACE_S3_BUCKET``                 the data bucket; ``TRACE_S3_ROOT`` an optional key prefix
``TRACE_S3_PUBLIC_ENDPOINT_URL``    the S3 endpoint clients reach, if not the same (optional)
``TRACE_KMS_CURRENT_KEY``           KMS key id/ARN/alias that signs capability tokens
``TRACE_KMS_NEXT_KEY``              the published next key (optional)
``TRACE_STS_ROLE_ARN``              role assumed for attempt-scoped credentials (optional;
                                    without it ``/v1/task/credentials`` answers ``not_found``)
``TRACE_LAMBDA_FUNCTION``           the platform-managed runner invoked for ``runtime: lambda``
                                    tasks (optional; without it their invoke rows back off
                                    and go dead after 10 tries)
==================================  =========================================================

Lite: ``TRACE_UDF_RUNNER_URL`` (optional) is the Lite UDF runner (``trace udf runner``) that
``runtime: lambda`` tasks are sent to (``trace_lite.udf.UdfLauncher``).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import attrs

from trace_core import errors
from trace_core.ports import ObjectStore, Queue, Signer
from trace_lite.config import LiteSettings

PROFILES = ("lite", "aws")

Closer = Callable[[], Awaitable[None]]


@attrs.define
class DispatcherParts:
    """What a Dispatcher process needs from its profile."""

    signer: Signer
    queue: Queue
    object_store: ObjectStore
    extra_routes: list[Any] = attrs.field(factory=list)
    credential_minter: Any | None = None
    #: Builds the launcher of ``runtime: lambda`` tasks for the Dispatcher (AWS profile only).
    launcher_factory: Callable[[Any], Any] | None = None
    closers: list[Closer] = attrs.field(factory=list)

    async def close(self) -> None:
        for close in reversed(self.closers):
            await close()


@attrs.define
class WorkerParts:
    """What a worker process needs from its profile."""

    queue: Queue
    object_store: ObjectStore
    closers: list[Closer] = attrs.field(factory=list)

    async def close(self) -> None:
        for close in reversed(self.closers):
            await close()


def profile(env: Mapping[str, str] | None = None) -> str:
    """The selected profile. Raises ``ValidationFailed`` for an unknown one."""
    name = (os.environ if env is None else env).get("TRACE_PROFILE", "lite").strip() or "lite"
    if name not in PROFILES:
        raise errors.ValidationFailed(
            f"TRACE_PROFILE must be one of {PROFILES}", field="TRACE_PROFILE"
        )
    return name


def _require(env: Mapping[str, str], name: str) -> str:
    value = env.get(name, "").strip()
    if not value:
        raise errors.ValidationFailed(f"{name} is required with TRACE_PROFILE=aws", field=name)
    return value


def _aws_store(env: Mapping[str, str]) -> Any:
    from trace_aws.s3_store import S3ObjectStore

    return S3ObjectStore(
        _require(env, "TRACE_S3_BUCKET"),
        root=env.get("TRACE_S3_ROOT", ""),
        public_endpoint_url=env.get("TRACE_S3_PUBLIC_ENDPOINT_URL") or None,
    )


def _aws_queue(env: Mapping[str, str]) -> Any:
    from trace_aws.sqs_queue import SqsQueue

    return SqsQueue(_require(env, "TRACE_SQS_QUEUE_URL"))


async def dispatcher_parts(
    settings: LiteSettings, pool: Any, env: Mapping[str, str] | None = None
) -> DispatcherParts:
    """The Dispatcher's signer, queue, object store (and AWS credential minter)."""
    e = os.environ if env is None else env
    if profile(e) == "aws":
        from trace_aws.kms_signer import KmsSigner

        signer = KmsSigner(
            _require(e, "TRACE_KMS_CURRENT_KEY"), e.get("TRACE_KMS_NEXT_KEY") or None
        )
        queue = _aws_queue(e)
        store = _aws_store(e)
        parts = DispatcherParts(
            signer, queue, store, closers=[signer.close, queue.close, store.close]
        )
        if e.get("TRACE_STS_ROLE_ARN"):
            from trace_aws.credentials import StsCredentialMinter

            minter = StsCredentialMinter(e["TRACE_STS_ROLE_ARN"], store.bucket, root=store.root)
            parts.credential_minter = minter
            parts.closers.append(minter.close)
        if e.get("TRACE_LAMBDA_FUNCTION"):
            from trace_aws.lambda_invoker import LambdaInvoker, LambdaLauncher

            invoker = LambdaInvoker(e["TRACE_LAMBDA_FUNCTION"])
            parts.launcher_factory = lambda d: LambdaLauncher(d, invoker, store)
        return parts
    from trace_lite.local_signer import FileSigner
    from trace_lite.local_store import LocalObjectStore, object_routes
    from trace_lite.pg_queue import PgQueue
    from trace_lite.write_guard import StagingWriteGuard

    lite_store = LocalObjectStore(
        settings.object_root, settings.dispatcher_url, settings.object_secret
    )
    lite_queue = PgQueue(pool, settings.queue_name)
    lite_parts = DispatcherParts(
        FileSigner.init(settings.key_dir),
        lite_queue,
        lite_store,
        extra_routes=list(object_routes(lite_store, write_guard=StagingWriteGuard(pool))),
        closers=[lite_queue.close],
    )
    if e.get("TRACE_UDF_RUNNER_URL"):  # runtime: lambda tasks go to the Lite UDF runner
        from trace_lite.udf import RunnerInvoker, UdfLauncher

        runner = RunnerInvoker(e["TRACE_UDF_RUNNER_URL"])
        lite_parts.launcher_factory = lambda d: UdfLauncher(d, runner, lite_store)
        lite_parts.closers.append(runner.close)
    return lite_parts


async def worker_parts(
    settings: LiteSettings, state_url: str, env: Mapping[str, str] | None = None
) -> WorkerParts:
    """A worker's queue and object store."""
    e = os.environ if env is None else env
    if profile(e) == "aws":
        queue = _aws_queue(e)
        store = _aws_store(e)
        return WorkerParts(queue, store, closers=[queue.close, store.close])
    from trace_lite.local_store import LocalObjectStore
    from trace_lite.pg_queue import PgQueue

    lite_queue = PgQueue(state_url, settings.queue_name)
    return WorkerParts(
        lite_queue,
        LocalObjectStore(settings.object_root, settings.dispatcher_url, settings.object_secret),
        closers=[lite_queue.close],
    )


@attrs.define
class SinkParts:
    """What a sink process (and ``trace dlq``) needs from its profile: the object store, its
    dataset queues by name (``queue_for``; on AWS an existing queue, looked up: queues are
    created at deploy by ``trace_lite.buffer_queues``) and the task queue (``task_queue``)."""

    object_store: ObjectStore
    queue_for: Callable[[str], Queue]
    closers: list[Closer] = attrs.field(factory=list)
    task_queue: Callable[[], Queue] | None = None

    async def close(self) -> None:
        for close in reversed(self.closers):
            await close()


async def sink_parts(
    settings: LiteSettings, pool: Any, env: Mapping[str, str] | None = None
) -> SinkParts:
    """A sink process's object store and dataset queues (``trace sink run``)."""
    e = os.environ if env is None else env
    queues: dict[str, Queue] = {}
    store: Any
    make: Callable[[str], Queue]
    if profile(e) == "aws":
        from trace_aws.sqs_queue import SqsQueue

        store = _aws_store(e)
        make = SqsQueue.lookup
        make_task_queue: Callable[[], Queue] = lambda: _aws_queue(e)  # noqa: E731
    else:
        from trace_lite.local_store import LocalObjectStore
        from trace_lite.pg_queue import PgQueue

        store = LocalObjectStore(
            settings.object_root, settings.dispatcher_url, settings.object_secret
        )
        make = lambda name: PgQueue(pool, name)  # noqa: E731
        make_task_queue = lambda: make(settings.queue_name)  # noqa: E731

    def queue_for(name: str) -> Queue:
        if name not in queues:
            queues[name] = make(name)
        return queues[name]

    def task_queue() -> Queue:
        if "" not in queues:  # no buffer queue has an empty name
            queues[""] = make_task_queue()
        return queues[""]

    async def close() -> None:
        for q in queues.values():
            await q.close()  # type: ignore[attr-defined]
        if hasattr(store, "close"):
            await store.close()

    return SinkParts(store, queue_for, closers=[close], task_queue=task_queue)


def buffer_queue_creator(env: Mapping[str, str] | None = None) -> Callable[[str], Awaitable[None]]:
    """How this profile creates a buffer queue and its dead-letter queue at deploy
    (``trace_lite.buffer_queues``): SQS on AWS (idempotent), nothing on Lite."""
    e = os.environ if env is None else env
    if profile(e) == "aws":
        from trace_aws.sqs_queue import SqsQueue

        async def create(name: str) -> None:
            queue = await asyncio.to_thread(SqsQueue.create, name)
            await queue.close()

        return create
    from trace_lite.buffer_queues import create_nothing

    return create_nothing


__all__ = [
    "PROFILES",
    "DispatcherParts",
    "SinkParts",
    "WorkerParts",
    "buffer_queue_creator",
    "dispatcher_parts",
    "profile",
    "sink_parts",
    "worker_parts",
]
