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
from collections.abc import AsyncIterator
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


class QueryLimitExceeded(errors.ValidationFailed):
    """The query was stopped by a limit: ``limit`` is ``time`` (the deadline) or ``resources``
    (memory, CPU, a write to a file: the process died without answering)."""

    def __init__(self, message: str, *, limit: str) -> None:
        super().__init__(message, field="sql")
        self.limit = limit


@attrs.frozen
class SandboxResult:
    columns: list[str]
    types: list[str]
    rows: list[list[Any]]
    truncated: bool
    #: Size of the sandbox's answer (the serialized rows).
    bytes: int = 0


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


@attrs.define
class _Sandbox:
    """A started sandbox process waiting for its one request, and its private directory."""

    proc: asyncio.subprocess.Process
    scratch: Path

    def alive(self) -> bool:
        """Whether the process is still running. Looks without reaping it (``WNOWAIT``): asyncio's
        child watcher may not have seen a death yet (``returncode`` still None)."""
        if self.proc.returncode is not None:
            return False
        try:
            exited = os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:  # already reaped by the watcher
            return False
        return exited is None

    def kill(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)


async def _start(scratch_root: Path | None) -> _Sandbox:
    scratch = Path(tempfile.mkdtemp(prefix="trace-query-", dir=scratch_root))
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
    except OSError as exc:
        shutil.rmtree(scratch, ignore_errors=True)
        raise errors.Unavailable("the query sandbox could not start") from exc
    return _Sandbox(proc, scratch)


#: Pre-started sandboxes a server keeps unless told otherwise (``query_api.setup(pool_size=)``).
DEFAULT_POOL_SIZE = 2


class SandboxPool:
    """Pre-started sandbox processes (DuckDB imported, OS limits set), each used for exactly
    one query and then gone; taking one starts a replacement in the background. Without a
    pool every query starts its own process (about 0.5-1 s on 2 cores)."""

    def __init__(self, size: int = DEFAULT_POOL_SIZE, *, scratch_root: Path | None = None) -> None:
        if size < 1:
            raise ValueError("a sandbox pool holds at least one process")
        self._size = size
        self._scratch_root = scratch_root
        self._idle: list[_Sandbox] = []
        self._filling: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def size(self) -> int:
        return self._size

    def idle_pids(self) -> list[int]:
        """The process ids of the sandboxes waiting to be given out (tests, diagnostics)."""
        return [sandbox.proc.pid for sandbox in self._idle]

    def fill(self) -> None:
        """Start sandboxes up to the pool's size, in the background."""
        if not self._closed and (self._filling is None or self._filling.done()):
            self._filling = asyncio.create_task(self._fill())

    async def ready(self) -> None:
        """Wait until the pool is full (started sandboxes, not necessarily done importing)."""
        while not self._closed and len(self._idle) < self._size:
            self.fill()
            assert self._filling is not None
            await asyncio.shield(self._filling)

    async def _fill(self) -> None:
        while not self._closed and len(self._idle) < self._size:
            sandbox = await _start(self._scratch_root)
            if self.closed:  # closed while it started
                _discard(sandbox)
                await sandbox.proc.wait()
                return
            self._idle.append(sandbox)

    async def take(self) -> _Sandbox:
        """A started sandbox, never one that was given out before. Raises ``Unavailable``."""
        sandbox = None
        while self._idle:
            candidate = self._idle.pop(0)
            if candidate.alive():
                sandbox = candidate
                break
            _discard(candidate)
        self.fill()
        return sandbox if sandbox is not None else await _start(self._scratch_root)

    async def close(self) -> None:
        """Kill the idle sandboxes and remove their directories."""
        self._closed = True
        if self._filling is not None:
            self._filling.cancel()
            with contextlib.suppress(asyncio.CancelledError, errors.TraceError):
                await self._filling
        idle, self._idle = self._idle, []
        for sandbox in idle:
            _discard(sandbox)
            await sandbox.proc.wait()


def _discard(sandbox: _Sandbox) -> None:
    sandbox.kill()
    shutil.rmtree(sandbox.scratch, ignore_errors=True)


async def run_sandboxed(
    sql: str,
    tables: dict[str, TableSource],
    limits: Limits,
    *,
    pool: SandboxPool | None = None,
    scratch_root: Path | None = None,
    keep_scratch: bool = False,
    gate: bool = True,
    s3: dict[str, Any] | None = None,
) -> SandboxResult:
    """Run ``sql`` over ``tables`` (dataset name -> the pinned version's data) in a sandbox
    process of its own (from ``pool``, or started now). Returns the rows. Raises
    ``ValidationFailed`` (refused by the gate, a syntax error, a failed query, a limit exceeded:
    time, memory), ``NotFound`` (a name not granted: "dataset not found or not readable"),
    ``PayloadTooLarge`` (over ``max_bytes``), ``Unavailable`` (the sandbox could not run).

    ``s3``: how the sandbox reads pinned ``s3://`` objects (``trace_lite.query.s3``).

    Tests only: ``keep_scratch`` leaves the private directory for inspection; ``gate=False``
    skips the sandbox's parse-level checks to show the lock-down and OS limits hold alone."""
    sandbox = await pool.take() if pool is not None else await _start(scratch_root)
    proc = sandbox.proc
    request: dict[str, Any] = {
        "sql": sql,
        "tables": [_source(n, t) for n, t in tables.items()],
        "threads": limits.threads,
        "memory_limit": limits.memory_limit,
        "extension_directory": str(sandbox.scratch / "extensions"),
        "max_rows": limits.max_rows,
        "max_bytes": limits.max_bytes,
        "cpu_s": int(limits.threads * limits.deadline_s) + 1,
        "gate": gate,
    }
    if s3 is not None:
        request["s3"] = s3
    try:
        try:
            out, err = await asyncio.wait_for(
                proc.communicate(json.dumps(request).encode()), limits.deadline_s
            )
        except TimeoutError:
            sandbox.kill()
            await proc.wait()
            raise QueryLimitExceeded(
                "the query exceeded its time limit and was stopped", limit="time"
            ) from None
        finally:
            if proc.returncode is None:
                sandbox.kill()
                await proc.wait()
    finally:
        if not keep_scratch:
            shutil.rmtree(sandbox.scratch, ignore_errors=True)
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
        raise QueryLimitExceeded(
            f"the query exceeded a resource limit and was stopped (exit {returncode})",
            limit="resources",
        )
    if not answer.get("ok"):
        cls = _ERRORS.get(str(answer.get("error")), errors.ValidationFailed)
        raise cls(str(answer.get("message", "query failed")), field="sql")
    return SandboxResult(
        columns=list(answer["columns"]),
        types=list(answer["types"]),
        rows=list(answer["rows"]),
        truncated=bool(answer["truncated"]),
        bytes=len(out),
    )


class SandboxStream:
    """A query's rows as an Arrow stream from a sandbox process (``open_stream``).

    ``columns``, ``types`` and ``schema`` (the Arrow IPC schema message) are known once it is
    open; ``batches()`` yields each Arrow IPC record batch message as it arrives, then sets
    ``rows`` and ``truncated``. The Arrow IPC stream format is ``schema``, the batches, then
    ``sandbox.ARROW_EOS``."""

    def __init__(self, sandbox: _Sandbox) -> None:
        self._sandbox = sandbox
        self.columns: list[str] = []
        self.types: list[str] = []
        self.schema = b""
        self.rows = 0
        self.truncated = False
        self.bytes = 0
        self.timed_out = False

    async def _frame(self) -> tuple[bytes, bytes]:
        stdout = self._sandbox.proc.stdout
        assert stdout is not None
        try:
            head = await stdout.readexactly(5)
            return head[:1], await stdout.readexactly(int.from_bytes(head[1:], "big"))
        except asyncio.IncompleteReadError:
            raise self._died() from None

    def _died(self) -> errors.TraceError:
        if self.timed_out:
            return QueryLimitExceeded(
                "the query exceeded its time limit and was stopped", limit="time"
            )
        return QueryLimitExceeded(
            "the query exceeded a resource limit and was stopped", limit="resources"
        )

    async def batches(self) -> AsyncIterator[bytes]:
        """Each record batch message. Raises ``QueryLimitExceeded`` (stopped by the deadline
        or a resource limit), ``PayloadTooLarge``, ``ValidationFailed`` (the query failed
        midway)."""
        while True:
            kind, payload = await self._frame()
            if kind == b"B":
                self.bytes += len(payload)
                yield payload
            elif kind == b"E":
                end = json.loads(payload)
                self.rows, self.truncated = int(end["rows"]), bool(end["truncated"])
                return
            else:
                raise _refusal(payload)


def _refusal(payload: bytes) -> errors.TraceError:
    answer = json.loads(payload)
    cls = _ERRORS.get(str(answer.get("error")), errors.ValidationFailed)
    return cls(str(answer.get("message", "query failed")), field="sql")


@contextlib.asynccontextmanager
async def open_stream(
    sql: str,
    tables: dict[str, TableSource],
    limits: Limits,
    *,
    pool: SandboxPool | None = None,
    scratch_root: Path | None = None,
    s3: dict[str, Any] | None = None,
) -> AsyncIterator[SandboxStream]:
    """Run ``sql`` in a sandbox process answering an Arrow stream (``SandboxStream``), at most
    ``limits.max_rows`` rows and ``limits.max_bytes`` of batches; the process is killed at the
    wall-clock deadline (counted from here, across the consumer's reading) and when the
    context exits. Raises, on entering, as ``run_sandboxed``."""
    sandbox = await pool.take() if pool is not None else await _start(scratch_root)
    proc = sandbox.proc
    assert proc.stdin is not None and proc.stderr is not None
    request: dict[str, Any] = {
        "mode": "arrow",
        "sql": sql,
        "tables": [_source(n, t) for n, t in tables.items()],
        "threads": limits.threads,
        "memory_limit": limits.memory_limit,
        "extension_directory": str(sandbox.scratch / "extensions"),
        "max_rows": limits.max_rows,
        "max_bytes": limits.max_bytes,
        "cpu_s": int(limits.threads * limits.deadline_s) + 1,
    }
    if s3 is not None:
        request["s3"] = s3
    stream = SandboxStream(sandbox)

    def deadline() -> None:
        stream.timed_out = True
        sandbox.kill()

    timer = asyncio.get_running_loop().call_later(limits.deadline_s, deadline)
    stderr = asyncio.create_task(proc.stderr.read())  # drained: a full pipe would block it
    try:
        proc.stdin.write(json.dumps(request).encode())
        await proc.stdin.drain()
        proc.stdin.close()
        kind, payload = await stream._frame()
        if kind != b"H":
            raise _refusal(payload)
        header = json.loads(payload)
        stream.columns, stream.types = list(header["columns"]), list(header["types"])
        kind, stream.schema = await stream._frame()
        if kind != b"S":
            raise _refusal(stream.schema)
        yield stream
    except (BrokenPipeError, ConnectionResetError):
        raise stream._died() from None
    finally:
        timer.cancel()
        sandbox.kill()
        await proc.wait()
        err = await stderr
        if proc.returncode not in (0, -signal.SIGKILL) and err:
            # may name paths: logged here, never answered
            log.warning(
                "query sandbox stderr", extra={"stderr": err[-500:].decode(errors="replace")}
            )
        shutil.rmtree(sandbox.scratch, ignore_errors=True)
