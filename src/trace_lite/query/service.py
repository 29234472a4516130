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

Postgres-table datasets are refused for now: the design is that this process exports the pinned
rows (never a connection) into the sandbox; see ``docs/architecture/query.md``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

import attrs
import duckdb

from trace_core import errors, query_gate
from trace_core.access import Caller, TaskCaller
from trace_core.token import CapabilityClaims
from trace_lite.datasets import Datasets, TaskOrgRow
from trace_lite.datasets import Q as DATASETS_SQL
from trace_lite.local_store import LocalObjectStore
from trace_lite.orgs import first
from trace_lite.pg import fetch_as, transaction
from trace_lite.query.runner import Limits, SandboxResult, run_sandboxed

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
        row = _parser.execute("SELECT json_serialize_sql(?::VARCHAR)", [sql]).fetchone()
    assert row is not None
    parsed: dict[str, Any] = json.loads(row[0])
    return parsed


@attrs.frozen
class QueryResult:
    columns: list[str]
    types: list[str]
    rows: list[list[Any]]
    truncated: bool
    #: dataset name -> the version the query read (pinned once at its start)
    versions: dict[str, str | None]


class QueryService:
    def __init__(
        self,
        datasets: Datasets,
        store: LocalObjectStore,
        *,
        limits: Limits = Limits(),
        scratch_root: Path | None = None,
        concurrency: int = 2,
    ) -> None:
        """``concurrency``: sandbox processes running at once (each may use ``limits``'
        memory and threads); further queries wait for a slot, their pins already held."""
        self._datasets = datasets
        self._store = store
        self._limits = limits
        self._scratch_root = scratch_root
        self._slots = asyncio.Semaphore(concurrency)

    @property
    def limits(self) -> Limits:
        return self._limits

    async def query(
        self, caller: Caller, org: str, sql: str, *, max_rows: int | None = None
    ) -> QueryResult:
        """Run ``sql`` for ``caller`` in ``org``. Returns at most ``max_rows`` rows (capped by
        the service's limit; ``truncated`` says more existed). Raises ``ValidationFailed``
        (field ``sql``: syntax error with its position, a refused construct, a failed query, a
        limit exceeded), ``NotFound`` ("dataset not found or not readable"),
        ``PayloadTooLarge``, ``Unavailable``."""
        started = time.perf_counter()
        outcome = "refused"
        rows = 0
        try:
            names = sorted(query_gate.admit(parse(sql), None))
            result = await self._run(caller, org, sql, names, max_rows)
            outcome, rows = "ok", len(result.rows)
            return result
        except errors.TraceError as exc:
            outcome = exc.code
            raise
        finally:
            log.info(
                "query",
                extra={
                    "org": org,
                    "outcome": outcome,
                    "rows": rows,
                    "latency_ms": round((time.perf_counter() - started) * 1000, 1),
                },
            )

    async def query_for_task(
        self, claims: CapabilityClaims, sql: str, *, max_rows: int | None = None
    ) -> QueryResult:
        """``query`` for a running task: only the datasets its capability token grants, in the
        org of the task's row (a token whose ``org_id`` claim names another org is refused, as
        ``Datasets.resolve_for_task``). Raises as ``query``, and ``Unauthenticated``."""
        async with transaction(self._datasets.pool) as cur:
            params = {"task_id": claims.task_id}
            task = first(await fetch_as(cur, TaskOrgRow, DATASETS_SQL["task_org"], params))
        if task is None:
            raise errors.NotFound("no such task", field="task_id")
        if task.org_id != claims.org_id:
            raise errors.Unauthenticated("capability token: org_id is not the task's org")
        caller = TaskCaller.from_grants(task.org_id, claims.task_id, claims.grants)
        return await self.query(caller, task.org_name, sql, max_rows=max_rows)

    async def _run(
        self, caller: Caller, org: str, sql: str, names: list[str], max_rows: int | None
    ) -> QueryResult:
        limit = self._limits.max_rows if max_rows is None else min(max_rows, self._limits.max_rows)
        limits = attrs.evolve(self._limits, max_rows=max(limit, 0))
        if not names:
            sandboxed = await self._sandbox(sql, {}, limits)
            return _result(sandboxed, {})
        ttl = limits.deadline_s + 60
        try:
            resolution = await self._datasets.resolve(caller, org, names, pin_ttl_s=ttl)
        except (errors.NotFound, errors.Forbidden):
            raise errors.NotFound(query_gate.NOT_READABLE, field="sql") from None
        try:
            tables: dict[str, list[str]] = {}
            for d in resolution.datasets:
                if d.storage_kind != "parquet":
                    raise errors.ValidationFailed(
                        f"dataset {d.dataset} is stored in Postgres; querying Postgres-table "
                        "datasets is not built yet",
                        field="sql",
                    )
                tables[d.dataset] = [str(self._store.path_for(o["object_key"])) for o in d.objects]
            sandboxed = await self._sandbox(sql, tables, limits)
            versions = {d.dataset: d.dataset_version for d in resolution.datasets}
            return _result(sandboxed, versions)
        finally:
            try:
                await self._datasets.release_pin(None, org, resolution.pin_id)
            except errors.TraceError:
                log.warning("query pin release failed; it expires", extra={"org": org})

    async def _sandbox(
        self, sql: str, tables: dict[str, list[str]], limits: Limits
    ) -> SandboxResult:
        async with self._slots:
            return await self._spawn(sql, tables, limits)

    async def _spawn(self, sql: str, tables: dict[str, list[str]], limits: Limits) -> SandboxResult:
        return await run_sandboxed(sql, tables, limits, scratch_root=self._scratch_root)


def _result(s: SandboxResult, versions: dict[str, str | None]) -> QueryResult:
    return QueryResult(s.columns, s.types, s.rows, s.truncated, versions)
