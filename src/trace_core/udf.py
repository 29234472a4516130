"""UDF bundles and invocations: what the launchers, the runner and the SDKs agree on.

Theory of operation (``docs/architecture/udf.md``, ADR 0028)
-----------------------------------------------------------

* A bundle is a zip addressed by ``name`` and ``digest`` (``sha256:<hex>`` of its bytes), stored
  at ``bundle_key_for(org_id, ref)``; its manifest ``trace-udf.json`` is checked by
  ``parse_manifest``.
* ``invoke_payload`` is the one builder of ``wire.LambdaInvokePayload``: the AWS launcher and the
  Lite launcher both call it, so the event a handler's runtime receives is the same everywhere.
* ``parse_response`` checks a runtime's answer (``{"result", "final_events"}``) and
  ``failure_outcome`` turns a failed invocation into the completion fields the runner sends.

Pure: no I/O, no clock.
"""

from __future__ import annotations

import enum
import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any, Final

import attrs

from trace_core import errors, json_limits, wire

MANIFEST_NAME: Final = "trace-udf.json"
MANIFEST_FORMAT: Final = 1
#: The largest response body a runtime may post (Lambda's synchronous payload limit).
MAX_RESPONSE_BYTES: Final = 6 * 1024 * 1024
DEFAULT_MEMORY_MB: Final = 256
MIN_MEMORY_MB: Final = 32
MAX_MEMORY_MB: Final = 4096
MAX_TIMEOUT_S: Final = 900

_BUNDLE_NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_ENTRY_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_./-]{0,199}$")


class Language(enum.StrEnum):
    PYTHON = "python"
    NODE = "node"
    RUST = "rust"


#: The runtime entry of each language when the manifest names none.
DEFAULT_ENTRY: Final = {
    Language.PYTHON: "",
    Language.NODE: "runtime.mjs",
    Language.RUST: "bootstrap",
}


@attrs.frozen
class BundleRef:
    """A bundle by name and content digest (``sha256:<64 hex>``)."""

    name: str
    digest: str

    @property
    def hex(self) -> str:
        return self.digest.removeprefix("sha256:")


@attrs.frozen
class Limits:
    memory_mb: int = DEFAULT_MEMORY_MB
    #: None: the task's ``timeout_s``.
    timeout_s: int | None = None


@attrs.frozen
class Manifest:
    """``trace-udf.json``, checked."""

    name: str
    language: Language
    handler: str
    entry: str
    limits: Limits = Limits()

    def to_json(self) -> dict[str, Any]:
        limits: dict[str, Any] = {"memory_mb": self.limits.memory_mb}
        if self.limits.timeout_s is not None:
            limits["timeout_s"] = self.limits.timeout_s
        out: dict[str, Any] = {
            "format": MANIFEST_FORMAT,
            "name": self.name,
            "language": self.language.value,
            "handler": self.handler,
            "limits": limits,
        }
        if self.entry and self.entry != DEFAULT_ENTRY[self.language]:
            out["entry"] = self.entry
        return out


def digest_of(data: bytes) -> str:
    """The content digest of a bundle's bytes: ``sha256:<hex>``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def parse_ref(value: object, field: str = "bundle") -> BundleRef:
    """A bundle reference from ``{"name", "digest"}``. Raises ``ValidationFailed``."""
    if not isinstance(value, Mapping):
        raise errors.ValidationFailed(
            f"{field} must be an object with name and digest", field=field
        )
    extra = sorted(set(value) - {"name", "digest"})
    if extra:
        raise errors.ValidationFailed(f"{field} has unknown field {extra[0]!r}", field=field)
    name, digest = value.get("name"), value.get("digest")
    if not isinstance(name, str) or not _BUNDLE_NAME_RE.match(name):
        raise errors.ValidationFailed(
            f"{field}.name must match {_BUNDLE_NAME_RE.pattern}", field=f"{field}.name"
        )
    if not isinstance(digest, str) or not _DIGEST_RE.match(digest):
        raise errors.ValidationFailed(
            f"{field}.digest must be sha256:<64 lowercase hex digits>", field=f"{field}.digest"
        )
    return BundleRef(name, digest)


def bundle_key_for(org_id: str, ref: BundleRef) -> str:
    """Where a bundle lives in the object store."""
    return f"org/{org_id}/bundles/{ref.name}/sha256-{ref.hex}.zip"


def bundle_ref(task: wire.TaskPayload) -> BundleRef | None:
    """The bundle a task's payload references (``payload.bundle``), or None.
    Raises ``ValidationFailed`` for a malformed reference."""
    raw = task.payload.get("bundle")
    return None if raw is None else parse_ref(raw, "payload.bundle")


def bundle_key(task: wire.TaskPayload) -> str:
    """The object key of a task's bundle: ``payload.bundle`` (name + digest), else the older
    ``payload.bundle_key``, else ``org/{org}/bundles/{operator}/bundle.zip``.
    Raises ``ValidationFailed`` for a malformed reference."""
    ref = bundle_ref(task)
    if ref is not None:
        return bundle_key_for(task.org_id, ref)
    return str(
        task.payload.get("bundle_key") or f"org/{task.org_id}/bundles/{task.operator}/bundle.zip"
    )


def invoke_payload(
    task: wire.TaskPayload, claim: wire.ClaimResponse, bundle_url: str
) -> wire.LambdaInvokePayload:
    """The event of one attempt: the task payload, the claim's credentials, the bundle URL."""
    fields = {a.name: getattr(task, a.name) for a in attrs.fields(wire.TaskPayload)}
    fields["attempt"] = claim.attempt
    return wire.LambdaInvokePayload(
        **fields,
        capability_token=claim.capability_token,
        lease_token=claim.lease_token,
        lease_expires_at=claim.lease_expires_at,
        bundle_url=bundle_url,
    )


def parse_manifest(raw: bytes) -> Manifest:
    """Check ``trace-udf.json``. Raises ``ValidationFailed`` naming the field."""
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise errors.ValidationFailed(f"{MANIFEST_NAME} is not JSON", field="$") from None
    if not isinstance(doc, dict):
        raise errors.ValidationFailed(f"{MANIFEST_NAME} must be an object", field="$")
    allowed = {"format", "name", "language", "handler", "entry", "limits"}
    for key in sorted(doc):
        if key not in allowed:
            raise errors.ValidationFailed(f"unknown field {key!r}", field=key)
    if doc.get("format") != MANIFEST_FORMAT:
        raise errors.ValidationFailed(f"format must be {MANIFEST_FORMAT}", field="format")
    name = doc.get("name")
    if not isinstance(name, str) or not _BUNDLE_NAME_RE.match(name):
        raise errors.ValidationFailed(f"name must match {_BUNDLE_NAME_RE.pattern}", field="name")
    try:
        language = Language(str(doc.get("language")))
    except ValueError:
        raise errors.ValidationFailed(
            "language must be python, node or rust", field="language"
        ) from None
    handler = doc.get("handler")
    if not isinstance(handler, str) or not 1 <= len(handler) <= 200:
        raise errors.ValidationFailed(
            "handler must be a string of 1-200 characters", field="handler"
        )
    if language is Language.PYTHON and not re.match(r"^[A-Za-z_][\w.]*\.[A-Za-z_]\w*$", handler):
        raise errors.ValidationFailed("a python handler is module.function", field="handler")
    entry = doc.get("entry", DEFAULT_ENTRY[language])
    if not isinstance(entry, str) or (
        entry and (not _ENTRY_RE.match(entry) or ".." in entry.split("/"))
    ):
        raise errors.ValidationFailed("entry must be a relative path in the bundle", field="entry")
    limits_doc = doc.get("limits", {})
    if not isinstance(limits_doc, dict):
        raise errors.ValidationFailed("limits must be an object", field="limits")
    for key in sorted(limits_doc):
        if key not in ("memory_mb", "timeout_s"):
            raise errors.ValidationFailed(f"unknown field {key!r}", field=f"limits.{key}")
    memory = limits_doc.get("memory_mb", DEFAULT_MEMORY_MB)
    if type(memory) is not int or not MIN_MEMORY_MB <= memory <= MAX_MEMORY_MB:
        raise errors.ValidationFailed(
            f"memory_mb must be an integer {MIN_MEMORY_MB}-{MAX_MEMORY_MB}",
            field="limits.memory_mb",
        )
    timeout = limits_doc.get("timeout_s")
    if timeout is not None and (type(timeout) is not int or not 1 <= timeout <= MAX_TIMEOUT_S):
        raise errors.ValidationFailed(
            f"timeout_s must be an integer 1-{MAX_TIMEOUT_S}", field="limits.timeout_s"
        )
    return Manifest(name, language, handler, entry, Limits(memory, timeout))


def effective_timeout_s(manifest: Manifest, task_timeout_s: int) -> int:
    """The invocation's timeout: the smaller of the manifest's and the task's."""
    if manifest.limits.timeout_s is None:
        return task_timeout_s
    return min(manifest.limits.timeout_s, task_timeout_s)


class FailureCode(enum.StrEnum):
    """``error.code`` of an attempt a UDF failed (``docs/architecture/udf.md``, Failures)."""

    ERROR = "udf_error"
    CRASHED = "udf_crashed"
    TIMEOUT = "udf_timeout"
    OUT_OF_MEMORY = "udf_out_of_memory"
    INVALID_RESPONSE = "udf_invalid_response"
    INIT_ERROR = "udf_init_error"
    BUNDLE_UNAVAILABLE = "udf_bundle_unavailable"
    BAD_BUNDLE = "udf_bad_bundle"


#: Error types a runtime reports for a handler that ran out of memory.
OOM_ERROR_TYPES: Final = frozenset({"MemoryError", "Runtime.OutOfMemory", "RangeError.OutOfMemory"})
#: The error type of a failure retrying cannot fix (the SDKs' ``NonRetryableError``).
NON_RETRYABLE_ERROR_TYPE: Final = "NonRetryableError"


@attrs.frozen
class Failure:
    code: FailureCode
    message: str
    retryable: bool = True

    def outcome(self) -> dict[str, Any]:
        """The completion fields of this failure (``CompleteRequest`` minus the fence)."""
        return {
            "outcome": "failed",
            "retryable": self.retryable,
            "error": {"code": self.code.value, "message": self.message[:1000]},
        }


def handler_failure(body: bytes) -> Failure:
    """The failure a runtime reported on ``/invocation/{id}/error`` (any body: a garbled one
    is reported as such)."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        doc = None
    if not isinstance(doc, dict):
        return Failure(FailureCode.ERROR, f"handler failed: {body[:200]!r}")
    etype = str(doc.get("errorType") or "Error")[:200]
    message = str(doc.get("errorMessage") or "")[:800]
    if etype in OOM_ERROR_TYPES:
        return Failure(FailureCode.OUT_OF_MEMORY, f"{etype}: {message}")
    return Failure(
        FailureCode.ERROR, f"{etype}: {message}", retryable=etype != NON_RETRYABLE_ERROR_TYPE
    )


def parse_response(body: bytes, fence: wire.FenceFields) -> wire.CompleteRequest:
    """The completion of a runtime's response ``{"result", "final_events"}``. Raises
    ``ValidationFailed`` naming what is wrong (the runner fails the attempt with it)."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise errors.ValidationFailed(
            f"the response is not JSON: {body[:80]!r}", field="$"
        ) from None
    if not isinstance(doc, dict):
        raise errors.ValidationFailed(
            f"the response must be an object, not {type(doc).__name__}", field="$"
        )
    for key in sorted(doc):
        if key not in ("result", "final_events"):
            raise errors.ValidationFailed(f"unknown field {key!r} in the response", field=key)
    result = doc.get("result")
    if result is not None and not isinstance(result, dict):
        raise errors.ValidationFailed(
            f"result must be an object or null, not {type(result).__name__}", field="result"
        )
    json_limits.check(doc, path="response")
    return wire.structure(
        {
            "task_id": fence.task_id,
            "attempt": fence.attempt,
            "lease_token": fence.lease_token,
            "outcome": "succeeded",
            "result": result,
            "final_events": doc.get("final_events", []),
        },
        wire.CompleteRequest,
    )


__all__ = [
    "DEFAULT_ENTRY",
    "MANIFEST_NAME",
    "MAX_RESPONSE_BYTES",
    "BundleRef",
    "Failure",
    "FailureCode",
    "Language",
    "Limits",
    "Manifest",
    "bundle_key",
    "bundle_key_for",
    "bundle_ref",
    "digest_of",
    "effective_timeout_s",
    "handler_failure",
    "invoke_payload",
    "parse_manifest",
    "parse_ref",
    "parse_response",
]
