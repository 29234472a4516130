"""What a handler receives: the invocation, its work payload, its granted datasets, and calls
scoped to its own attempt (``docs/architecture/udf.md``, "The handler contract").

Rows (``emit_rows``) and events (``emit_event``) are collected while the handler runs and
published only after it returns (``Context.publish_rows`` from the runtime; the events travel
in the response and commit with the completion): a failed handler publishes nothing.
"""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from trace_udf._api import TaskApi

#: Inline buffer batches: at most this many rows and bytes (canonical JSON lines) each.
MAX_BATCH_ROWS = 1000
MAX_BATCH_BYTES = 240 * 1024
_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:\-/]{0,190}$")


class NonRetryableError(Exception):
    """Raise this from a handler for a failure retrying cannot fix: the task fails for good."""


@dataclass(frozen=True)
class Invocation:
    """The event: one attempt of one task (``wire.LambdaInvokePayload``)."""

    task_id: str
    org_id: str
    operator: str
    attempt: int
    max_attempts: int
    timeout_s: int
    staging_prefix: str
    payload: dict[str, Any]
    capability_token: str
    lease_token: str
    lease_expires_at: str
    bundle_url: str
    job_id: str | None = None
    status: str = "running"
    #: Epoch milliseconds by which the handler must answer (``Lambda-Runtime-Deadline-Ms``).
    deadline_ms: int | None = None
    #: The Runtime API's request id of this invocation.
    request_id: str = ""
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_event(
        cls, event: Mapping[str, Any], *, deadline_ms: int | None = None, request_id: str = ""
    ) -> Invocation:
        """Read an event (unknown fields are kept in ``raw``). Raises ``ValueError``."""
        try:
            return cls(
                task_id=str(event["task_id"]),
                org_id=str(event["org_id"]),
                operator=str(event.get("operator", "udf")),
                attempt=int(event["attempt"]),
                max_attempts=int(event.get("max_attempts", 1)),
                timeout_s=int(event.get("timeout_s", 60)),
                staging_prefix=str(event.get("staging_prefix", "")),
                payload=dict(event.get("payload") or {}),
                capability_token=str(event["capability_token"]),
                lease_token=str(event["lease_token"]),
                lease_expires_at=str(event.get("lease_expires_at", "")),
                bundle_url=str(event.get("bundle_url", "")),
                job_id=event.get("job_id"),
                status=str(event.get("status", "running")),
                deadline_ms=deadline_ms,
                request_id=request_id,
                raw=dict(event),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not an invoke payload: {exc!r}") from None

    @property
    def fence(self) -> dict[str, Any]:
        return {"task_id": self.task_id, "attempt": self.attempt, "lease_token": self.lease_token}


def token_grants(token: str) -> list[str]:
    """The dataset names a capability token grants for reading (``grants.datasets.read``),
    read from its payload without verifying it (the Dispatcher verifies every call)."""
    try:
        part = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
        names = claims.get("grants", {}).get("datasets", {}).get("read", [])
        return [str(n) for n in names]
    except (IndexError, ValueError, AttributeError):
        return []


def _lines(rows: Iterable[Mapping[str, Any]]) -> list[bytes]:
    return [json.dumps(r, sort_keys=True, separators=(",", ":")).encode() + b"\n" for r in rows]


def chunk_rows(rows: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Split rows into inline batches of at most ``MAX_BATCH_ROWS`` rows and
    ``MAX_BATCH_BYTES`` bytes. Raises ``ValueError`` for a single row over the byte limit."""
    chunks: list[list[dict[str, Any]]] = []
    current: list[dict[str, Any]] = []
    size = 0
    for row, line in zip(rows, _lines(rows), strict=True):
        if len(line) > MAX_BATCH_BYTES:
            raise ValueError(f"a row of {len(line)} bytes exceeds {MAX_BATCH_BYTES}")
        if current and (len(current) == MAX_BATCH_ROWS or size + len(line) > MAX_BATCH_BYTES):
            chunks.append(current)
            current, size = [], 0
        current.append(row)
        size += len(line)
    if current:
        chunks.append(current)
    return chunks


@dataclass
class _Batch:
    dataset: str
    key: str
    rows: list[dict[str, Any]]
    scope: dict[str, Any] | None


class Context:
    """The handler's view of its attempt."""

    def __init__(
        self,
        invocation: Invocation,
        api: TaskApi | None,
        *,
        query_fn: Callable[[str, int | None], list[dict[str, Any]]] | None = None,
    ) -> None:
        self.invocation = invocation
        self._api = api
        self._query_fn = query_fn
        self._batches: list[_Batch] = []
        self._calls: dict[str, int] = {}
        self.final_events: list[dict[str, Any]] = []

    @property
    def event(self) -> Invocation:
        return self.invocation

    @property
    def payload(self) -> dict[str, Any]:
        """The work payload (the task payload)."""
        return self.invocation.payload

    @property
    def datasets(self) -> list[str]:
        """The datasets this attempt may read (the job's declared inputs)."""
        return token_grants(self.invocation.capability_token)

    def remaining_ms(self) -> int | None:
        """Milliseconds until the deadline, or None without one."""
        if self.invocation.deadline_ms is None:
            return None
        return max(0, self.invocation.deadline_ms - int(time.time() * 1000))

    def query(self, sql: str, *, max_rows: int | None = None) -> list[dict[str, Any]]:
        """Rows of ``sql`` over the granted datasets (``POST /v1/task/query``), as dicts.
        Raises ``TaskApiError`` (e.g. 404 for a dataset not granted, 422 for bad SQL)."""
        if self._query_fn is not None:
            return self._query_fn(sql, max_rows)
        body: dict[str, Any] = {**self.invocation.fence, "sql": sql}
        if max_rows is not None:
            body["max_rows"] = max_rows
        answer = self._require_api().call("/v1/task/query", body)
        names = [c["name"] for c in answer["columns"]]
        return [dict(zip(names, row, strict=True)) for row in answer["rows"]]

    def emit_rows(
        self,
        dataset: str,
        rows: Iterable[Mapping[str, Any]],
        *,
        key: str | None = None,
        scope: Mapping[str, Any] | None = None,
    ) -> str:
        """Collect rows for the buffered ``dataset``; they are published after the handler
        returns, in batches keyed ``{key}.{i}``. The default key is ``{dataset}.{n}`` (the
        n-th call for that dataset), stable across retries of the same input. Returns the
        key. Raises ``ValueError`` for a bad key or a row that is not a JSON object."""
        n = self._calls.get(dataset, 0)
        self._calls[dataset] = n + 1
        key = key if key is not None else f"{dataset}.{n}"
        if not _KEY_RE.match(key):
            raise ValueError(f"key {key!r} must match {_KEY_RE.pattern}")
        if any(b.key == key for b in self._batches):
            raise ValueError(f"key {key!r} was already used in this invocation")
        materialised = [dict(r) for r in rows]
        for i, row in enumerate(materialised):
            json.dumps(row)  # TypeError for a value JSON cannot hold
            if not all(isinstance(k, str) for k in row):
                raise ValueError(f"row {i}: keys must be strings")
        self._batches.append(
            _Batch(dataset, key, materialised, dict(scope) if scope is not None else None)
        )
        return key

    def emit_event(self, type: str, payload: Mapping[str, Any] | None = None, *, key: str) -> None:
        """Collect an event; it is committed with the completion (``final_events``)."""
        self.final_events.append({"key": key, "type": type, "payload": dict(payload or {})})

    def heartbeat(self) -> None:
        """Tell the Dispatcher the attempt is alive (``POST /v1/task/heartbeat``) and keep the
        renewed token. Raises ``TaskApiError`` (409 ``lease_lost``/``task_canceled``: stop)."""
        if self._api is None:
            return
        answer = self._api.call("/v1/task/heartbeat", dict(self.invocation.fence))
        self._api.token = str(answer["capability_token"])

    @property
    def pending_rows(self) -> dict[str, list[dict[str, Any]]]:
        """The rows collected so far, by dataset."""
        out: dict[str, list[dict[str, Any]]] = {}
        for batch in self._batches:
            out.setdefault(batch.dataset, []).extend(batch.rows)
        return out

    def publish_rows(self) -> int:
        """Publish every collected batch (``POST /v1/task/buffer-publish``, inline); returns
        how many calls were made. A key the task published before is a no-op there."""
        calls = 0
        api = self._require_api()
        for batch in self._batches:
            for i, rows in enumerate(chunk_rows(batch.rows)):
                body: dict[str, Any] = {"key": f"{batch.key}.{i}", "dataset": batch.dataset}
                body["rows"] = rows
                if batch.scope is not None:
                    body["scope"] = batch.scope
                api.call("/v1/task/buffer-publish", {**self.invocation.fence, "batch": body})
                calls += 1
        return calls

    def _require_api(self) -> TaskApi:
        if self._api is None:
            raise RuntimeError("no task API in this context")
        return self._api
