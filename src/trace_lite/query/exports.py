"""Batch exports: a query's whole result written as Parquet or CSV under the org's results prefix.

``QueryExports.start`` gates the SQL at once (a refused query is refused before anything is
recorded), records a ``running`` export in Postgres (``query_exports``, migration 0022) and runs
it in the background through ``QueryService.open_stream`` (the same sandbox, pins and limits as
an interactive query, with the export's own ceilings): the Arrow batches are written to a
private file by this process (the sandbox never writes a file), checked against the byte limit,
then stored at ``org/{org_id}/results/{export_id}.{parquet|csv}`` through the ObjectStore port.

Every ending is a compare-and-swap from ``running`` (``sql/query_exports.sql``): an export ends
exactly once. ``cancel`` moves it to ``canceled`` and stops the run at once in this process; a
run on another server sees the state when it polls (every ``poll_s``) and stops, killing its
sandbox; a result stored after a cancellation loses the swap and is deleted. A ``running``
export past its deadline (its server died) is failed as ``abandoned`` when it is next read.
Results are kept ``retention_s`` (7 days) and removed by ``purge_expired``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import tempfile
import uuid
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

import attrs
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
from psycopg.types.json import Jsonb

from trace_core import errors, query_gate
from trace_core.access import UserCaller
from trace_core.ports import ObjectStore
from trace_lite import sqlfile
from trace_lite.datasets import Datasets
from trace_lite.orgs import first
from trace_lite.pg import fetch_as, transaction
from trace_lite.query.runner import Limits
from trace_lite.query.service import QueryService, QueryStream, parse

log = logging.getLogger("trace.query")

Q = sqlfile.load("query_exports.sql")

FORMATS = ("parquet", "csv")
#: The ceilings of one export (``max_rows`` caps what a caller may ask for).
EXPORT_LIMITS = Limits(deadline_s=600.0, max_rows=10_000_000, max_bytes=1024**3)
RETENTION_S = 7 * 86_400


class _ExportRow(NamedTuple):
    export_id: str
    org_id: str
    requested_by: str
    format: str
    state: str
    max_rows: int
    rows: int | None
    bytes: int | None
    truncated: bool | None
    object_key: str | None
    versions: dict[str, Any] | None
    error: dict[str, Any] | None
    created_at: datetime
    finished_at: datetime | None
    expires_at: datetime
    abandoned: bool


class _State(NamedTuple):
    state: str


class _Expired(NamedTuple):
    export_id: str
    object_key: str | None


@attrs.frozen
class ExportStatus:
    """What ``GET /v1/query/exports/{id}`` answers."""

    export_id: str
    #: ``running``, ``succeeded``, ``failed`` or ``canceled``
    state: str
    format: str
    created_at: str
    expires_at: str
    finished_at: str | None = None
    rows: int | None = None
    bytes: int | None = None
    #: whether the result stopped at the row cap with more rows left
    truncated: bool | None = None
    #: dataset name -> the version the export read
    versions: dict[str, Any] | None = None
    #: ``{error, message}`` of a failed export
    error: dict[str, Any] | None = None
    #: a signed GET URL of the result (succeeded exports only)
    url: str | None = None


def result_key(org_id: str, export_id: str, fmt: str) -> str:
    """Where an export's result is stored: the org's results prefix."""
    return f"org/{org_id}/results/{export_id}.{fmt}"


def _public(exc: errors.TraceError) -> dict[str, str]:
    caller_side = (errors.ValidationFailed, errors.NotFound, errors.PayloadTooLarge)
    message = exc.message if isinstance(exc, caller_side) else "the export failed"
    return {"error": exc.code, "message": message}


class QueryExports:
    def __init__(
        self,
        service: QueryService,
        datasets: Datasets,
        store: ObjectStore,
        *,
        limits: Limits = EXPORT_LIMITS,
        retention_s: int = RETENTION_S,
        url_expires_s: int = 3600,
        poll_s: float = 0.5,
        scratch_root: Path | None = None,
    ) -> None:
        self._service = service
        self._datasets = datasets
        self._store = store
        self._limits = limits
        self._retention_s = retention_s
        self._url_expires_s = url_expires_s
        self._poll_s = poll_s
        self._scratch_root = scratch_root
        self._running: dict[str, asyncio.Task[None]] = {}
        self._closing = False

    @property
    def limits(self) -> Limits:
        return self._limits

    async def start(
        self,
        caller: UserCaller,
        org: str,
        sql: str,
        *,
        fmt: str = "parquet",
        max_rows: int | None = None,
    ) -> ExportStatus:
        """Record and start an export of ``sql`` for ``caller`` in ``org``. Returns its
        ``running`` status. Raises ``ValidationFailed`` (the gate: syntax, a refused construct;
        a format that is not ``parquet``/``csv``), ``NotFound`` (a name that is no dataset at
        all is found only when it runs: its status says ``not_found``)."""
        if fmt not in FORMATS:
            raise errors.ValidationFailed("format: one of parquet, csv", field="format")
        query_gate.admit(parse(sql), None)
        cap = self._limits.max_rows if max_rows is None else min(max_rows, self._limits.max_rows)
        export_id = str(uuid.uuid4())
        async with transaction(self._datasets.pool) as cur:
            await cur.execute(
                Q["export_insert"],
                {
                    "export_id": export_id,
                    "org_id": caller.org_id,
                    "requested_by": caller.subject,
                    "sql": sql,
                    "format": fmt,
                    "max_rows": cap,
                    "deadline_s": self._limits.deadline_s + 60,
                    "retention_s": self._retention_s,
                },
            )
        run = self._run(export_id, caller, org, sql, fmt, cap)
        self._running[export_id] = asyncio.create_task(run)
        return await self.status(caller.subject, export_id)

    async def wait(self, export_id: str) -> None:
        """Wait until this process's run of ``export_id`` (if any) has ended."""
        task = self._running.get(export_id)
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(task)

    async def status(self, subject: str, export_id: str) -> ExportStatus:
        """The export's status (with a signed URL once it succeeded). Only its requester sees
        it. Raises ``NotFound`` (no such export, or another user's)."""
        row = await self._row(subject, export_id)
        if row.abandoned and await self._end(export_id, "export_fail", error=ABANDONED):
            row = await self._row(subject, export_id)
        url = None
        if row.state == "succeeded" and row.object_key is not None:
            url = await self._store.signed_url(
                row.object_key, method="GET", expires_in=self._url_expires_s
            )
        return ExportStatus(
            export_id=row.export_id,
            state=row.state,
            format=row.format,
            created_at=row.created_at.isoformat(),
            expires_at=row.expires_at.isoformat(),
            finished_at=row.finished_at.isoformat() if row.finished_at else None,
            rows=row.rows,
            bytes=row.bytes,
            truncated=row.truncated,
            versions=row.versions,
            error=row.error,
            url=url,
        )

    async def cancel(self, subject: str, export_id: str) -> ExportStatus:
        """Cancel a running export: its sandbox is killed (here at once, on another server at
        its next poll) and nothing is stored. Raises ``NotFound``, ``Conflict`` (it has
        already ended)."""
        await self._row(subject, export_id)
        if not await self._end(export_id, "export_cancel"):
            raise errors.Conflict("the export has already ended", field="export_id")
        task = self._running.get(export_id)
        if task is not None:
            task.cancel()
            await self.wait(export_id)
        return await self.status(subject, export_id)

    async def purge_expired(self, *, limit: int = 100) -> int:
        """Delete the results and rows of exports past their retention. Returns how many."""
        async with transaction(self._datasets.pool) as cur:
            expired = await fetch_as(cur, _Expired, Q["export_expired"], {"limit": limit})
        for e in expired:
            if e.object_key is not None:
                await self._store.delete(e.object_key)
            async with transaction(self._datasets.pool) as cur:
                await cur.execute(Q["export_delete"], {"export_id": e.export_id})
        return len(expired)

    async def close(self) -> None:
        """Stop this process's running exports (failed as abandoned)."""
        self._closing = True
        tasks = list(self._running.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _row(self, subject: str, export_id: str) -> _ExportRow:
        try:
            uuid.UUID(export_id)
        except ValueError:
            raise errors.NotFound("no such export", field="export_id") from None
        async with transaction(self._datasets.pool) as cur:
            row = first(await fetch_as(cur, _ExportRow, Q["export_get"], {"export_id": export_id}))
        if row is None or row.requested_by != subject:
            raise errors.NotFound("no such export", field="export_id")
        return row

    async def _end(
        self, export_id: str, query: str, *, error: dict[str, str] | None = None, **values: Any
    ) -> bool:
        """Compare-and-swap ``running`` -> the ending of ``query``. Returns whether it won."""
        params: dict[str, Any] = {"export_id": export_id, **values}
        if error is not None:
            params["error"] = Jsonb(error)
        async with transaction(self._datasets.pool) as cur:
            return bool(await fetch_as(cur, _State, Q[query], params))

    async def _run(
        self, export_id: str, caller: UserCaller, org: str, sql: str, fmt: str, max_rows: int
    ) -> None:
        scratch = Path(tempfile.mkdtemp(prefix="trace-query-result-", dir=self._scratch_root))
        watcher = asyncio.create_task(self._watch(export_id, asyncio.current_task()))
        key = None
        try:
            path = scratch / f"result.{fmt}"
            async with self._service.open_stream(
                caller, org, sql, max_rows=max_rows, limits=self._limits
            ) as stream:
                await _write(stream, path, fmt)
                rows, truncated, versions = stream.rows, stream.truncated, stream.versions
            size = path.stat().st_size
            if size > self._limits.max_bytes:
                raise errors.PayloadTooLarge("the export's result is over its byte limit")
            key = result_key(caller.org_id, export_id, fmt)
            await self._store.put(key, await asyncio.to_thread(path.read_bytes))
            stored = await self._end(
                export_id,
                "export_succeed",
                rows=rows,
                bytes=size,
                truncated=truncated,
                object_key=key,
                versions=Jsonb(versions),
            )
            if not stored:  # canceled (or abandoned) while it ran: keep nothing
                await self._store.delete(key)
        except asyncio.CancelledError:
            if key is not None:
                await self._store.delete(key)
            if self._closing:
                await self._end(export_id, "export_fail", error=ABANDONED)
            else:
                await self._end(export_id, "export_cancel")
        except errors.TraceError as exc:
            log.info("query export failed", extra={"export_id": export_id, "error": exc.code})
            await self._end(export_id, "export_fail", error=_public(exc))
        except Exception:
            log.exception("query export failed", extra={"export_id": export_id})
            await self._end(export_id, "export_fail", error=INTERNAL)
        finally:
            watcher.cancel()
            shutil.rmtree(scratch, ignore_errors=True)
            self._running.pop(export_id, None)

    async def _watch(self, export_id: str, run: asyncio.Task[Any] | None) -> None:
        """Stop ``run`` once the export's row is no longer running (canceled elsewhere)."""
        while run is not None:
            await asyncio.sleep(self._poll_s)
            async with transaction(self._datasets.pool) as cur:
                row = first(
                    await fetch_as(cur, _State, Q["export_state"], {"export_id": export_id})
                )
            if row is None or row.state != "running":
                run.cancel()
                return


ABANDONED = {"error": "abandoned", "message": "the export's server stopped before it ended"}
INTERNAL = {"error": "internal", "message": "the export failed"}


async def _write(stream: QueryStream, path: Path, fmt: str) -> None:
    """Write the stream's batches to ``path`` as Parquet or CSV (in a thread: file I/O)."""
    schema = pa.ipc.read_schema(pa.py_buffer(stream.schema))
    open_writer: Callable[[], Any] = (
        (lambda: pq.ParquetWriter(str(path), schema))
        if fmt == "parquet"
        else (lambda: pa_csv.CSVWriter(str(path), schema))
    )
    writer = await asyncio.to_thread(open_writer)
    try:
        async for message in stream.batches():
            batch = pa.ipc.read_record_batch(pa.py_buffer(message), schema)
            await asyncio.to_thread(writer.write_batch, batch)
    finally:
        await asyncio.to_thread(writer.close)
