"""Shared boto3 plumbing: clients, the thread pool, and the one table that turns botocore
errors into ``trace_core.errors`` at the boundary.

boto3 is synchronous. Every adapter runs its calls in a small ``ThreadPoolExecutor`` of its
own (``AwsCalls``) so a 20 s SQS long poll never starves the event loop's default executor;
boto3 clients are thread-safe, sessions are not, so one client is created per adapter.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import os
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import boto3
import botocore.config
import botocore.exceptions

from trace_core import errors

T = TypeVar("T")

#: Error codes that mean "the thing is not there".
_NOT_FOUND = frozenset(
    {
        "NoSuchKey",
        "NotFound",
        "404",
        "NoSuchBucket",
        "ResourceNotFoundException",
        "AWS.SimpleQueueService.NonExistentQueue",
        "QueueDoesNotExist",
        "NotFoundException",
        "ReceiptHandleIsInvalid",
        "MessageNotInflight",
    }
)
#: Error codes that mean "the credential may not do this".
_FORBIDDEN = frozenset(
    {
        "AccessDenied",
        "AccessDeniedException",
        "403",
        "UnauthorizedOperation",
        "KMSInvalidStateException",
        "DisabledException",
    }
)
#: Error codes that mean "the credential did not verify".
_UNAUTHENTICATED = frozenset(
    {
        "InvalidClientTokenId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidAccessKeyId",
        "UnrecognizedClientException",
        "IncompleteSignature",
    }
)
#: Error codes that mean "the request was wrong" (a bug in the caller or in Trace).
_INVALID = frozenset(
    {
        "ValidationException",
        "ValidationError",
        "InvalidParameterValue",
        "InvalidParameterException",
        "InvalidRequestException",
        "MalformedPolicyDocument",
        "InvalidInput",
    }
)
_TOO_LARGE = frozenset({"EntityTooLarge", "RequestEntityTooLarge", "PackedPolicyTooLarge"})


def error_code(exc: botocore.exceptions.ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def translate(exc: Exception, what: str) -> errors.TraceError:
    """The Trace error for a botocore/boto3 exception raised while doing ``what``.

    Throttling, 5xx and connection failures become ``Unavailable`` (retry with backoff); the
    caller raises the result ``from exc``.
    """
    if isinstance(exc, botocore.exceptions.ClientError):
        code = error_code(exc)
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        message = f"{what}: {code or status}"
        if code in _NOT_FOUND or status == 404:
            return errors.NotFound(message)
        if code in _UNAUTHENTICATED:
            return errors.Unauthenticated(message)
        if code in _FORBIDDEN or status == 403:
            return errors.Forbidden(message)
        if code in _TOO_LARGE or status == 413:
            return errors.PayloadTooLarge(message)
        if code in _INVALID:
            return errors.ValidationFailed(message)
        return errors.Unavailable(message)
    if isinstance(exc, botocore.exceptions.BotoCoreError | OSError):
        return errors.Unavailable(f"{what}: {type(exc).__name__}")
    return errors.Unavailable(f"{what}: {type(exc).__name__}: {exc}")


class AwsCalls:
    """Runs blocking boto3 calls off the event loop and translates their errors."""

    def __init__(self, max_workers: int = 16, name: str = "trace-aws") -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers, thread_name_prefix=name)

    async def run(self, what: str, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` in the pool. Raises a ``trace_core.errors`` class only."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))
        except errors.TraceError:
            raise
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError, OSError) as exc:
            raise translate(exc, what) from exc

    def close(self) -> None:
        """Stop the pool without waiting for calls in flight (a long poll ends on its own)."""
        self._pool.shutdown(wait=False, cancel_futures=True)


def client(
    service: str,
    *,
    endpoint_url: str | None = None,
    region_name: str | None = None,
    max_pool_connections: int = 32,
    connect_timeout: float = 5.0,
    read_timeout: float = 30.0,
    credentials: Mapping[str, str] | None = None,
    signature_version: str | None = None,
    max_attempts: int = 3,
) -> Any:
    """A boto3 client with Trace's timeouts; ``endpoint_url`` for moto, MinIO, LocalStack.

    ``endpoint_url`` and ``region_name`` default to ``TRACE_AWS_ENDPOINT_URL`` and
    ``AWS_REGION``/``AWS_DEFAULT_REGION`` (``us-east-1``).
    """
    cfg = botocore.config.Config(
        max_pool_connections=max_pool_connections,
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        retries={"total_max_attempts": max_attempts, "mode": "standard"},
        signature_version=signature_version,
        s3={"addressing_style": "path"} if service == "s3" else None,
    )
    region = (
        region_name
        or os.environ.get("AWS_REGION")
        or os.environ.get("AWS_DEFAULT_REGION")
        or "us-east-1"
    )
    return boto3.session.Session().client(
        service,
        endpoint_url=endpoint_url or os.environ.get("TRACE_AWS_ENDPOINT_URL") or None,
        region_name=region,
        config=cfg,
        **dict(credentials or {}),
    )
