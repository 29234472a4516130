"""The Query Service: resolve and pin the named datasets once, run the SQL in a sandbox, release.

``QueryService.query`` is the whole path of one query:

1. DuckDB parses the SQL in this process (``json_serialize_sql`` on the text passed as a
   parameter: parsing only, nothing executes) and ``trace_core.query_gate`` admits one SELECT
   and names the datasets it references.
2. ``Datasets.resolve`` checks the caller's read permission on every name and pins each to its
   active version in one statement (one snapshot of the pointer sets). Any refusal, whatever the
   reason, is "dataset not found or not readable", naming none.
3. The pinned versions' promoted Parquet objects (local files in Lite) are handed to a fresh
   sandbox process (``trace_lite.query.runner``), which gates the SQL again with exactly those
   names, loads them into tables named after the datasets, locks DuckDB down and runs the SQL.
4. The pin is released whatever happened (it expires on its own if the release fails).

Postgres-table datasets: this process copies the pinned version's table out of the data
database (one read-only, repeatable-read transaction, ``COPY ... TO STDOUT``) into a private
CSV file the sandbox loads before its lock-down; the sandbox never gets a connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import shutil
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, NamedTuple

import attrs
import duckdb
import psycopg
from psycopg import sql as pgsql

from trace_core import errors, query_gate
from trace_core.access import Caller
from trace_core.token import CapabilityClaims
from trace_lite.datasets import Datasets
from trace_lite.local_store import LocalObjectStore
from trace_lite.query.runner import (
    CsvTable,
    Limits,
    QueryLimitExceeded,
    SandboxPool,
    SandboxResult,
    SandboxStream,
    TableSource,
    open_stream,
    run_sandboxed,
)
from trace_lite.query.s3 import S3Access

log = logging.getLogger("trace.query")

_parser_lock = threading.Lock()
_parser: duckdb.DuckDBPyConnection | None = None


def parse(sql: str) -> dict[str, Any]:
    """DuckDB's parse tree of ``sql`` as JSON (``json_serialize_sql``). The text is a bound
    parameter of a fixed statement, so it is parsed, never executed."""
    global _parser
    with _parser_lock:
        if _parser is None:
            con = duckdb.connect(
                ":memory:",
                config={
                    "threads": 1,
                    "autoinstall_known_extensions": False,
                    "autoload_known_extensions": False,
                    "enable_external_access": False,
                    "lock_configuration": True,
                },
            )
            _parser = con
        (row,) = _parser.execute("SELECT json_serialize_sql(?::VARCHAR)", [sql]).fetchall()
    (tree,) = row
    parsed: dict[str, Any] = json.loads(tree)
    return parsed


@attrs.frozen
class QueryOutcome:
    """One query, for the log line and metrics. ``outcome``: ``ok``, ``refused`` (the gate, a
    syntax error, a failed query), ``not_readable``, ``timed_out``, ``limit_exceeded``
    (memory, CPU), ``too_large`` (over the byte cap), or another error code."""

    outcome: str
    rows: int
    bytes: int
    seconds: float


def _outcome(exc: errors.TraceError) -> str:
    if isinstance(exc, QueryLimitExceeded):
        return "timed_out" if exc.limit == "time" else "limit_exceeded"
    if isinstance(exc, errors.PayloadTooLarge):
        return "too_large"
    if isinstance(exc, errors.NotFound):
        return "not_readable"
    if isinstance(exc, errors.ValidationFailed):
        return "refused"
    return exc.code


@attrs.frozen
class QueryResult:
    columns: list[str]
    types: list[str]
    rows: list[list[Any]]
    truncated: bool
    #: dataset name -> the version the query read (pinned once at its start)
    versions: dict[str, str | None]
    bytes: int = 0


class _Pinned(NamedTuple):
    tables: dict[str, TableSource]
    versions: dict[str, str | None]
    #: the sandbox's S3 access to the pinned objects (``S3Access.options``), or None
    s3: dict[str, Any] | None
    #: start releasing the pin now (once the sandbox holds its own copy of the pinned data);
    #: the context's exit then waits for that release instead of making its own
    release: Callable[[], None]


#: Set while ``QueryService.query`` runs its sandbox: called once the sandbox has its private
#: copy of the pinned data (``run_sandboxed(on_staged=)``), so the pin's release overlaps the
#: query instead of following it. Unset when the sandbox reads the store itself (S3).
_on_staged: contextvars.ContextVar[Callable[[], None] | None] = contextvars.ContextVar(
    "trace_query_on_staged", default=None
)


#: Limits of a streamed answer (Arrow IPC, NDJSON) and of a batch export's default.
STREAM_LIMITS = Limits(deadline_s=300.0, max_rows=1_000_000, max_bytes=1024**3)


@attrs.define
class QueryStream:
    """An open streamed query (``QueryService.open_stream``): its columns, the versions it
    pinned, and its rows as Arrow IPC messages (``schema``, then ``batches()``, then
    ``sandbox.ARROW_EOS``); ``rows`` and ``truncated`` are set once the batches are read."""

    columns: list[str]
    types: list[str]
    #: dataset name -> the version the query reads (pinned once at its start)
    versions: dict[str, str | None]
    schema: bytes
    _sandbox: SandboxStream

    def batches(self) -> AsyncIterator[bytes]:
        """Each Arrow record batch message. Raises ``QueryLimitExceeded`` (deadline or a
        resource limit), ``PayloadTooLarge``, ``ValidationFailed`` (the query failed midway)."""
        return self._sandbox.batches()

    @property
    def rows(self) -> int:
        return self._sandbox.rows

    @property
    def truncated(self) -> bool:
        return self._sandbox.truncated

    @property
    def bytes(self) -> int:
        return self._sandbox.bytes


class QueryService:
    def __init__(
        self,
        datasets: Datasets,
        store: LocalObjectStore | None,
        *,
        limits: Limits = Limits(),
        scratch_root: Path | None = None,
        concurrency: int = 2,
        data_url: str | None = None,
        max_export_bytes: int = 256 * 1024 * 1024,
        pool: SandboxPool | None = None,
        observe: Callable[[QueryOutcome], None] | None = None,
        stream_limits: Limits = STREAM_LIMITS,
        s3: S3Access | None = None,
    ) -> None:
        """``concurrency``: sandbox processes running at once (each may use ``limits``'
        memory and threads); further queries wait for a slot, their pins already held.
        ``data_url``: the data database, where Postgres-table datasets live (without it they
        are refused); at most ``max_export_bytes`` of one is copied into a sandbox. ``pool``:
        pre-started sandboxes (each still used for one query only). ``observe`` is called once per
        query with its ``QueryOutcome`` (metrics). ``stream_limits``: the ceiling of a streamed
        answer (``open_stream``: 1,000,000 rows, 1 GiB of Arrow batches, 300 s). ``s3``: the
        pinned Parquet objects are in this bucket (the AWS profile; ``store`` may be None):
        the sandbox reads them through DuckDB's httpfs (``trace_lite.query.s3``)."""
        self._stream_limits = stream_limits
        self._s3 = s3
        self._pool = pool
        self._observe = observe
        self._data_url = data_url
        self._max_export_bytes = max_export_bytes
        self._datasets = datasets
        self._store = store
        self._limits = limits
        self._scratch_root = scratch_root
        self._slots = asyncio.Semaphore(concurrency)

    @property
    def limits(self) -> Limits:
        return self._limits

    @property
    def stream_limits(self) -> Limits:
        return self._stream_limits

    async def query(
        self, caller: Caller, org: str, sql: str, *, max_rows: int | None = None
    ) -> QueryResult:
        """Run ``sql`` for ``caller`` in ``org``. Returns at most ``max_rows`` rows (capped by
        the service's limit; ``truncated`` says more existed). Raises ``ValidationFailed``
        (field ``sql``: syntax error with its position, a refused construct, a failed query, a
        limit exceeded), ``NotFound`` ("dataset not found or not readable"),
        ``PayloadTooLarge``, ``Unavailable``."""
        started = time.perf_counter()
        outcome, rows, size = "failed", 0, 0
        try:
            names = sorted(query_gate.admit(parse(sql), None))
            limits = self._capped(self._limits, max_rows)
            async with self._pinned(caller, org, names, limits) as (tables, versions, s3, release):
                staged = _on_staged.set(release if s3 is None else None)
                try:
                    sandboxed = await self._sandbox(sql, tables, limits, s3)
                finally:
                    _on_staged.reset(staged)
            result = _result(sandboxed, versions)
            outcome, rows, size = "ok", len(result.rows), result.bytes
            return result
        except errors.TraceError as exc:
            outcome = _outcome(exc)
            raise
        finally:
            self._seen(org, outcome, rows, size, started)

    def _seen(self, org: str, outcome: str, rows: int, size: int, started: float) -> None:
        seen = QueryOutcome(outcome, rows, size, time.perf_counter() - started)
        log.info(
            "query",
            extra={
                "org": org,
                "outcome": seen.outcome,
                "rows": seen.rows,
                "bytes": seen.bytes,
                "latency_ms": round(seen.seconds * 1000, 1),
            },
        )
        if self._observe is not None:
            self._observe(seen)

    @contextlib.asynccontextmanager
    async def open_stream(
        self,
        caller: Caller,
        org: str,
        sql: str,
        *,
        max_rows: int | None = None,
        limits: Limits | None = None,
    ) -> AsyncIterator[QueryStream]:
        """``query``, answered as an Arrow stream (``QueryStream``) for large results: at most
        ``max_rows`` rows (capped by ``limits``, default the service's ``stream_limits``), the
        pins held and one sandbox slot taken until the context exits, the sandbox killed at
        the deadline. Raises on entering as ``query``; while reading as
        ``QueryStream.batches``."""
        started = time.perf_counter()
        outcome = "failed"
        stream: QueryStream | None = None
        try:
            names = sorted(query_gate.admit(parse(sql), None))
            capped = self._capped(limits or self._stream_limits, max_rows)
            async with (
                self._pinned(caller, org, names, capped) as (tables, versions, s3, _release),
                self._slots,
                open_stream(
                    sql, tables, capped, pool=self._pool, scratch_root=self._scratch_root, s3=s3
                ) as sandboxed,
            ):
                stream = QueryStream(
                    sandboxed.columns, sandboxed.types, versions, sandboxed.schema, sandboxed
                )
                yield stream
                outcome = "ok"
        except errors.TraceError as exc:
            outcome = _outcome(exc)
            raise
        finally:
            rows, size = (stream.rows, stream.bytes) if stream is not None else (0, 0)
            self._seen(org, outcome, rows, size, started)

    async def task_scope(self, claims: CapabilityClaims) -> tuple[Caller, str]:
        """The caller a running task queries as (only the datasets its token grants) and its
        org's name, from the task's row (a token whose ``org_id`` claim names another org is
        refused: ``DatasetResolver.task_reader``, as ``Datasets.resolve_for_task``). Raises
        ``NotFound``, ``Unauthenticated``."""
        caller, task = await self._datasets.resolver.task_reader(claims)
        return caller, task.org_name

    async def query_for_task(
        self, claims: CapabilityClaims, sql: str, *, max_rows: int | None = None
    ) -> QueryResult:
        """``query`` for a running task: only the datasets its capability token grants, in the
        org of the task's row (``task_scope``). Raises as ``query``, and ``Unauthenticated``."""
        caller, org = await self.task_scope(claims)
        return await self.query(caller, org, sql, max_rows=max_rows)

    @staticmethod
    def _capped(limits: Limits, max_rows: int | None) -> Limits:
        limit = limits.max_rows if max_rows is None else min(max_rows, limits.max_rows)
        return attrs.evolve(limits, max_rows=max(limit, 0))

    @contextlib.asynccontextmanager
    async def _pinned(
        self, caller: Caller, org: str, names: list[str], limits: Limits
    ) -> AsyncIterator[_Pinned]:
        """Resolve and pin ``names`` for ``caller`` once; yields what the sandbox reads for
        each (its pinned Parquet objects, or a CSV copy of a Postgres table), the versions, and
        the S3 access to them (AWS); releases the pin on exit. Raises ``NotFound`` (not
        readable, naming none)."""
        if not names:
            yield _Pinned({}, {}, None, lambda: None)
            return
        ttl = limits.deadline_s + 60
        try:
            resolution = await self._datasets.resolve(caller, org, names, pin_ttl_s=ttl)
        except (errors.NotFound, errors.Forbidden):
            raise errors.NotFound(query_gate.NOT_READABLE, field="sql") from None
        releasing: list[asyncio.Task[None]] = []

        def release() -> None:
            if not releasing:
                releasing.append(asyncio.create_task(self._release(org, resolution.pin_id)))

        export_dir = Path(tempfile.mkdtemp(prefix="trace-query-export-", dir=self._scratch_root))
        try:
            tables: dict[str, TableSource] = {}
            keys: list[str] = []
            for d in resolution.datasets:
                if d.storage_kind == "parquet":
                    keys += [o["object_key"] for o in d.objects]
                    tables[d.dataset] = [self._locate(o["object_key"]) for o in d.objects]
                else:
                    tables[d.dataset] = await self._export(d.table, export_dir / f"{d.dataset}.csv")
            s3 = self._s3.options(keys) if self._s3 is not None and keys else None
            versions = {d.dataset: d.dataset_version for d in resolution.datasets}
            yield _Pinned(tables, versions, s3, release)
        finally:
            shutil.rmtree(export_dir, ignore_errors=True)
            release()
            await releasing[0]

    async def _release(self, org: str, pin_id: str) -> None:
        try:
            await self._datasets.release_pin(None, org, pin_id)
        except errors.TraceError:
            log.warning("query pin release failed; it expires", extra={"org": org})

    def _locate(self, key: str) -> str:
        """Where the sandbox reads a pinned object: its ``s3://`` URL or its local path."""
        if self._s3 is not None:
            return self._s3.url(key)
        if self._store is None:
            raise errors.Unavailable("the Query Service has no object store")
        return str(self._store.path_for(key))

    async def _export(self, table: str | None, dest: Path) -> CsvTable:
        """Copy a Postgres-table dataset's pinned version out of the data database into
        ``dest`` (headerless CSV) with its columns' DuckDB types. The sandbox gets the file,
        never a connection. Raises ``ValidationFailed`` (over ``max_export_bytes``, or no data
        database configured), ``Unavailable``."""
        if table is None:  # no active version yet: an empty table
            return CsvTable(str(dest), [])
        if self._data_url is None:
            raise errors.ValidationFailed(
                "Postgres-table datasets cannot be queried here (no data database)", field="sql"
            )
        # Postgres sends COPY's output one message per row: a blocking connection in a worker
        # thread reads them several times faster than an asyncio loop (1M rows: ~1 s vs ~3 s)
        try:
            columns = await asyncio.to_thread(self._export_sync, self._data_url, table, dest)
        except psycopg.Error as exc:
            raise errors.Unavailable(f"data database: {type(exc).__name__}") from exc
        return CsvTable(str(dest), columns)

    def _export_sync(self, data_url: str, table: str, dest: Path) -> list[tuple[str, str]]:
        schema, name = table.split(".", 1)
        written = 0
        with psycopg.connect(data_url) as conn:
            conn.read_only = True
            conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            with conn.transaction():
                cur = conn.execute(
                    "SELECT column_name, data_type FROM information_schema.columns "
                    "WHERE table_schema = %s AND table_name = %s ORDER BY ordinal_position",
                    (schema, name),
                )
                columns = [(str(c), _duckdb_type(str(t))) for c, t in cur.fetchall()]
                if not columns:  # the Sink has not created the version's table yet
                    return []
                query = pgsql.SQL("COPY (SELECT {} FROM {}) TO STDOUT WITH (FORMAT csv)").format(
                    pgsql.SQL(", ").join(pgsql.Identifier(c) for c, _ in columns),
                    pgsql.Identifier(schema, name),
                )
                with dest.open("wb") as out, conn.cursor().copy(query) as copy:
                    for chunk in copy:
                        written += len(chunk)
                        if written > self._max_export_bytes:
                            raise errors.ValidationFailed(
                                "a Postgres-table dataset is too large for an interactive query",
                                field="sql",
                            )
                        out.write(chunk)
        return columns

    async def _sandbox(
        self,
        sql: str,
        tables: dict[str, TableSource],
        limits: Limits,
        s3: dict[str, Any] | None = None,
    ) -> SandboxResult:
        async with self._slots:
            return await self._spawn(sql, tables, limits, s3)

    async def _spawn(
        self,
        sql: str,
        tables: dict[str, TableSource],
        limits: Limits,
        s3: dict[str, Any] | None = None,
    ) -> SandboxResult:
        return await run_sandboxed(
            sql,
            tables,
            limits,
            pool=self._pool,
            scratch_root=self._scratch_root,
            s3=s3,
            on_staged=_on_staged.get(),
        )


#: Postgres column types with a DuckDB twin; everything else (numeric: uint256 values overflow
#: DuckDB's decimals; json, bytea, arrays) is read as its text form.
_PG_TYPES = {
    "smallint": "SMALLINT",
    "integer": "INTEGER",
    "bigint": "BIGINT",
    "real": "FLOAT",
    "double precision": "DOUBLE",
    "boolean": "BOOLEAN",
    "text": "VARCHAR",
    "character varying": "VARCHAR",
    "date": "DATE",
    "timestamp without time zone": "TIMESTAMP",
    "timestamp with time zone": "TIMESTAMPTZ",
    "uuid": "UUID",
}


def _duckdb_type(pg_type: str) -> str:
    return _PG_TYPES.get(pg_type, "VARCHAR")


def _result(s: SandboxResult, versions: dict[str, str | None]) -> QueryResult:
    return QueryResult(s.columns, s.types, s.rows, s.truncated, versions, s.bytes)
