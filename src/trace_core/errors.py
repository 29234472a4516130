"""Trace's domain errors, grouped by what the caller should do.

Every error a kernel caller can see is one of these; adapters translate driver errors
(psycopg, botocore, OS errors) at the boundary with ``raise X from exc``. Servers map the
classes to HTTP status codes in one table (``trace_servers.http_errors``).

    TraceError                      -- never raised directly
    ├── InvalidRequest              -- a bug in the caller: fix the request (400/422)
    │   ├── MalformedBody           -- not JSON / wrong shape (400)
    │   ├── ValidationFailed        -- a field has the wrong type or value (422)
    │   ├── PayloadTooLarge         -- body or message over its limit (413)
    │   ├── UnsupportedMediaType    -- the body is not sent as application/json (415)
    │   └── UnsafeKey               -- object key escapes its prefix (422)
    ├── Unauthenticated             -- no credential, or one that does not verify (401)
    ├── Forbidden                   -- verified, but not allowed to do this (403)
    ├── NotFound                    -- the thing does not exist (404)
    ├── Conflict                    -- the state moved on: do not retry the same call (409)
    │   ├── LeaseLost               -- the fence (task_id, attempt, lease_token) no longer holds
    │   ├── TaskNotClaimable        -- the task is not waiting to be claimed
    │   ├── TaskCanceled            -- the task was canceled; stop working on it
    │   └── IdempotencyMismatch     -- same idempotent call, different body
    ├── Retryable                   -- try again later, with backoff (503)
    │   └── Unavailable             -- a dependency is down (database, queue, store)
    └── SignerError                 -- a signing key is missing or unusable (500)

Each class's docstring is its default message. ``code`` is the stable machine-readable code
sent in JSON error bodies; ``field`` names the offending field path where one applies.
"""

from __future__ import annotations

from typing import Any


class TraceError(Exception):
    """Trace error."""

    code: str = "trace_error"

    def __init__(
        self,
        message: str | None = None,
        *,
        field: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        self.message = message or (self.__doc__ or self.code).strip().splitlines()[0]
        self.field = field
        self.details = details or {}
        super().__init__(self.message)

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"error": self.code, "message": self.message}
        if self.field is not None:
            body["field"] = self.field
        if self.details:
            body["details"] = self.details
        return body


class InvalidRequest(TraceError):
    """The request is invalid."""

    code = "invalid_request"


class MalformedBody(InvalidRequest):
    """The request body is not valid JSON of the expected shape."""

    code = "malformed_body"


class ValidationFailed(InvalidRequest):
    """A field has the wrong type or value."""

    code = "validation_failed"


class PayloadTooLarge(InvalidRequest):
    """The payload exceeds its size limit."""

    code = "payload_too_large"


class UnsupportedMediaType(InvalidRequest):
    """The request body must be sent as application/json."""

    code = "unsupported_media_type"


class UnsafeKey(InvalidRequest):
    """The object key is not allowed (traversal, absolute, or outside its prefix)."""

    code = "unsafe_key"


class Unauthenticated(TraceError):
    """Authentication is required and was missing or did not verify."""

    code = "unauthenticated"


class Forbidden(TraceError):
    """The credential does not allow this operation."""

    code = "forbidden"


class NotFound(TraceError):
    """The requested resource does not exist."""

    code = "not_found"


class Conflict(TraceError):
    """The resource is in a state that does not allow this operation."""

    code = "conflict"


class LeaseLost(Conflict):
    """The lease is no longer held by this attempt (stale attempt or wrong lease token)."""

    code = "lease_lost"


class TaskNotClaimable(Conflict):
    """The task is not waiting to be claimed."""

    code = "task_not_claimable"


class TaskCanceled(Conflict):
    """The task was canceled."""

    code = "task_canceled"


class IdempotencyMismatch(Conflict):
    """This call was already made with a different body."""

    code = "idempotency_mismatch"


class Retryable(TraceError):
    """A transient failure; retry with backoff."""

    code = "retryable"


class Unavailable(Retryable):
    """A dependency is unavailable; retry with backoff."""

    code = "unavailable"


class SignerError(TraceError):
    """The signing key is missing or unusable."""

    code = "signer_error"


def _all_classes(cls: type[TraceError]) -> list[type[TraceError]]:
    out = [cls]
    for sub in cls.__subclasses__():
        out += _all_classes(sub)
    return out


_BY_CODE: dict[str, type[TraceError]] = {c.code: c for c in _all_classes(TraceError)}


def class_for_code(code: str | None) -> type[TraceError] | None:
    """The error class whose ``code`` is ``code`` (as sent in JSON error bodies), or None."""
    return _BY_CODE.get(code or "")


__all__ = [
    "Conflict",
    "Forbidden",
    "IdempotencyMismatch",
    "InvalidRequest",
    "LeaseLost",
    "MalformedBody",
    "NotFound",
    "PayloadTooLarge",
    "Retryable",
    "SignerError",
    "TaskCanceled",
    "TaskNotClaimable",
    "TraceError",
    "Unauthenticated",
    "Unavailable",
    "UnsafeKey",
    "UnsupportedMediaType",
    "ValidationFailed",
    "class_for_code",
]
