"""Run one query in a sandbox process: explicit environment, private directory, hard kill.

``run_sandboxed`` starts ``python -I -m trace_lite.query.sandbox`` (isolated mode: no
``PYTHON*`` variables, no user site, no current directory on ``sys.path``) with an environment
built from scratch (``PATH``, ``LC_ALL``, ``HOME``/``TMPDIR`` pointing into a fresh ``0700``
directory that is removed afterwards), in a new session, and kills the whole process group at
the deadline. Nothing of the parent's environment (database URLs, keys, tokens) reaches it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

import attrs

from trace_core import errors

log = logging.getLogger("trace.query")


@attrs.frozen
class Limits:
    """What one query may use. ``deadline_s`` is wall-clock (hard kill); the child's CPU limit
    is ``threads * deadline_s + 1`` seconds."""

    deadline_s: float = 30.0
    max_rows: int = 10_000
    max_bytes: int = 16 * 1024 * 1024
    memory_limit: str = "1GB"
    threads: int = 2


@attrs.frozen
class CsvTable:
    """A Postgres-table dataset's pinned rows, exported by the server as headerless CSV, with
    its columns' DuckDB types (``sandbox.CSV_TYPES``)."""

    path: str
    columns: list[tuple[str, str]]


#: What a sandbox reads for one dataset: its pinned Parquet files, or a CSV export.
TableSource = list[str] | CsvTable


def _source(name: str, source: TableSource) -> dict[str, Any]:
    if isinstance(source, CsvTable):
        return {"name": name, "csv": source.path, "columns": [list(c) for c in source.columns]}
    return {"name": name, "parquet": source}


@attrs.frozen
class SandboxResult:
    columns: list[str]
    types: list[str]
    rows: list[list[Any]]
    truncated: bool


_ERRORS: dict[str, type[errors.TraceError]] = {
    "validation_failed": errors.ValidationFailed,
    "not_found": errors.NotFound,
    "payload_too_large": errors.PayloadTooLarge,
    "unavailable": errors.Unavailable,
}


def _environment(scratch: Path) -> dict[str, str]:
    return {
        "PATH": "/usr/bin:/bin",
        "LC_ALL": "C.UTF-8",
        "HOME": str(scratch),
        "TMPDIR": str(scratch),
    }


async def run_sandboxed(
    sql: str,
    tables: dict[str, TableSource],
    limits: Limits,
    *,
    scratch_root: Path | None = None,
    keep_scratch: bool = False,
    gate: bool = True,
) -> SandboxResult:
    """Run ``sql`` over ``tables`` (dataset name -> the pinned version's data) in a
    fresh sandbox process. Returns the rows. Raises ``ValidationFailed`` (refused by the gate,
    a syntax error, a failed query, a limit exceeded: time, memory), ``NotFound`` (a name not
    granted: "dataset not found or not readable"), ``PayloadTooLarge`` (over ``max_bytes``),
    ``Unavailable`` (the sandbox could not run).

    Tests only: ``keep_scratch`` leaves the private directory for inspection; ``gate=False``
    skips the sandbox's parse-level checks to show the lock-down and OS limits hold alone."""
    scratch = Path(tempfile.mkdtemp(prefix="trace-query-", dir=scratch_root))
    request = {
        "sql": sql,
        "tables": [_source(n, t) for n, t in tables.items()],
        "threads": limits.threads,
        "memory_limit": limits.memory_limit,
        "extension_directory": str(scratch / "extensions"),
        "max_rows": limits.max_rows,
        "max_bytes": limits.max_bytes,
        "cpu_s": int(limits.threads * limits.deadline_s) + 1,
        "gate": gate,
    }
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-I",
            "-m",
            "trace_lite.query.sandbox",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=_environment(scratch),
            cwd=scratch,
            start_new_session=True,
        )
        try:
            out, err = await asyncio.wait_for(
                proc.communicate(json.dumps(request).encode()), limits.deadline_s
            )
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
            raise errors.ValidationFailed(
                "the query exceeded its time limit and was stopped", field="sql"
            ) from None
        finally:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
    finally:
        if not keep_scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    return _answer(out, err, proc.returncode)


def _answer(out: bytes, err: bytes, returncode: int | None) -> SandboxResult:
    try:
        answer = json.loads(out) if out else None
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        # killed by a limit (memory, CPU, a write to a file) before it could answer; its
        # stderr may name paths: logged here, never answered
        log.warning(
            "query sandbox gave no answer",
            extra={"exit": returncode, "stderr": err[-500:].decode(errors="replace")},
        )
        raise errors.ValidationFailed(
            f"the query exceeded a resource limit and was stopped (exit {returncode})",
            field="sql",
        )
    if not answer.get("ok"):
        cls = _ERRORS.get(str(answer.get("error")), errors.ValidationFailed)
        raise cls(str(answer.get("message", "query failed")), field="sql")
    return SandboxResult(
        columns=list(answer["columns"]),
        types=list(answer["types"]),
        rows=list(answer["rows"]),
        truncated=bool(answer["truncated"]),
    )
