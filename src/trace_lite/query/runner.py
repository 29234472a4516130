"""Run one query in a sandbox process: explicit environment, private directory, hard kill.

``run_sandboxed`` starts ``python -I -m trace_lite.query.sandbox`` (isolated mode: no
``PYTHON*`` variables, no user site, no current directory on ``sys.path``) with an environment
built from scratch (``PATH``, ``LC_ALL``, ``HOME``/``TMPDIR`` pointing into a fresh ``0700``
directory that is removed afterwards), in a new session, and kills the whole process group at
the deadline. Nothing of the parent's environment (database URLs, keys, tokens) reaches it.

``SandboxPool`` keeps sandboxes waiting for their one query; they are forked by a
``ForkServer`` (``trace_lite.query.forks``; the process is ``trace_lite.query.forkserver``,
started the same way) instead of started, and signalled through their pidfd. Before a sandbox gets its request, the pinned local files are
copied into its private directory (``_stage``), where its views read them by relative name.
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
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import attrs

from trace_core import errors
from trace_lite.query import nowrite
from trace_lite.query.forks import ForkedProcess, ForkServer

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


#: The folder of a sandbox's private directory that holds its copies of the pinned data.
DATA_DIR = "data"


def _place(source: str, dest: Path) -> None:
    """``dest`` as a hard link to ``source`` where the sandbox cannot write any file (its
    no-write filter) and both are on one file system; a copy otherwise."""
    if nowrite.AVAILABLE:
        try:
            os.link(source, dest)
            return
        except OSError:
            pass
    shutil.copyfile(source, dest)


def _stage(scratch: Path, tables: dict[str, TableSource]) -> list[dict[str, Any]]:
    """What the sandbox reads for each dataset. Local files get a name in the sandbox's private
    directory, relative to it, where its views read them: no physical path reaches DuckDB. The
    name is a hard link when the sandbox's no-write filter (``nowrite``) guarantees it cannot
    change the file (DuckDB may write a file it may read), a copy otherwise; either way the
    sandbox no longer needs the pin (a purge removes the store's name, not the file). A CSV
    export is private already. ``s3://`` URLs pass as they are (the sandbox copies them into
    tables)."""
    staged: list[dict[str, Any]] = []
    data = scratch / DATA_DIR
    for i, (name, source) in enumerate(tables.items()):
        if isinstance(source, CsvTable):
            csv = ""
            if source.columns:
                csv = f"{DATA_DIR}/{i}.csv"
                data.mkdir(mode=0o700, exist_ok=True)
                try:
                    os.link(source.path, scratch / csv)
                except OSError:
                    shutil.copyfile(source.path, scratch / csv)
            staged.append({"name": name, "csv": csv, "columns": [list(c) for c in source.columns]})
            continue
        files: list[str] = []
        for j, path in enumerate(source):
            if path.startswith("s3://"):
                files.append(path)
                continue
            files.append(f"{DATA_DIR}/{i}_{j}.parquet")
            data.mkdir(mode=0o700, exist_ok=True)
            _place(path, scratch / files[-1])
        staged.append({"name": name, "parquet": files})
    return staged


async def _staged(scratch: Path, tables: dict[str, TableSource]) -> list[dict[str, Any]]:
    if not tables:
        return []
    try:
        return await asyncio.to_thread(_stage, scratch, tables)
    except OSError as exc:
        raise errors.Unavailable("the pinned data could not be staged for the query") from exc


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

    proc: asyncio.subprocess.Process | ForkedProcess
    scratch: Path

    def alive(self) -> bool:
        """Whether the process is still running. Looks without reaping it (``WNOWAIT``): asyncio's
        child watcher may not have seen a death yet (``returncode`` still None)."""
        if isinstance(self.proc, ForkedProcess):
            return self.proc.running()
        if self.proc.returncode is not None:
            return False
        try:
            exited = os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:  # already reaped by the watcher
            return False
        return exited is None

    def kill(self) -> None:
        if isinstance(self.proc, ForkedProcess):
            self.proc.kill()
        elif self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)


def _scratch(scratch_root: Path | None) -> Path:
    return Path(tempfile.mkdtemp(prefix="trace-query-", dir=scratch_root))


async def _start(scratch_root: Path | None) -> _Sandbox:
    scratch = _scratch(scratch_root)
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
    """Pre-started sandbox processes (DuckDB imported, OS limits set, the query's fresh database
    open), each used for exactly one query and then gone; taking one starts a replacement in the
    background. The processes are forked by a ``ForkServer`` the pool starts (``fork=True``, the
    default; a new one if it ended) or, with ``fork=False`` or when the fork server cannot
    serve, each started as ``python -I -m trace_lite.query.sandbox`` (~0.2 s of CPU each)."""

    def __init__(
        self,
        size: int = DEFAULT_POOL_SIZE,
        *,
        scratch_root: Path | None = None,
        fork: bool = True,
    ) -> None:
        if size < 1:
            raise ValueError("a sandbox pool holds at least one process")
        self._size = size
        self._scratch_root = scratch_root
        self._fork = fork
        self._forks: ForkServer | None = None
        self._forks_lock = asyncio.Lock()
        self._idle: list[_Sandbox] = []
        self._filling: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def size(self) -> int:
        return self._size

    @property
    def fork_server_pid(self) -> int | None:
        """The fork server's process id, once started (tests, diagnostics)."""
        return self._forks.pid if self._forks is not None else None

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
            sandbox = await self._new()
            if self.closed:  # closed while it started
                _discard(sandbox)
                await sandbox.proc.wait()
                return
            self._idle.append(sandbox)

    async def _new(self) -> _Sandbox:
        """A new sandbox: forked when the fork server serves, started otherwise."""
        if self._fork:
            try:
                forks = await self._fork_server()
                scratch = _scratch(self._scratch_root)
                try:
                    return _Sandbox(await forks.fork(scratch), scratch)
                except BaseException:
                    shutil.rmtree(scratch, ignore_errors=True)
                    raise
            except errors.Unavailable:
                log.warning("query fork server unavailable; starting a sandbox process")
        return await _start(self._scratch_root)

    async def _fork_server(self) -> ForkServer:
        """The pool's fork server, started (again, if it ended) by one caller at a time."""
        async with self._forks_lock:
            if self._closed:
                raise errors.Unavailable("the sandbox pool is closed")
            if self._forks is None or not self._forks.alive:
                if self._forks is not None:
                    await self._forks.close()
                home = Path(tempfile.mkdtemp(prefix="trace-query-forks-", dir=self._scratch_root))
                self._forks = await ForkServer.start(home, _environment(home))
            return self._forks

    async def take(self) -> _Sandbox:
        """A started sandbox, never one that was given out before. Raises ``Unavailable``.

        Its replacement starts at once only if no other sandbox is waiting; otherwise when the
        query ends (``run_sandboxed`` and ``open_stream`` call ``fill``), so that it does not
        compete with the query for CPU."""
        sandbox = None
        while self._idle:
            candidate = self._idle.pop(0)
            if candidate.alive():
                sandbox = candidate
                break
            _discard(candidate)
        if sandbox is None and not self._closed:
            sandbox = await self._new()
        if not self._idle:
            self.fill()
        return sandbox if sandbox is not None else await _start(self._scratch_root)

    async def close(self) -> None:
        """Kill the idle sandboxes and the fork server, and remove their directories."""
        self._closed = True
        if self._filling is not None:
            self._filling.cancel()
            with contextlib.suppress(asyncio.CancelledError, errors.TraceError):
                await self._filling
        idle, self._idle = self._idle, []
        for sandbox in idle:
            _discard(sandbox)
            await sandbox.proc.wait()
        async with self._forks_lock:
            if self._forks is not None:
                await self._forks.close()


def _discard(sandbox: _Sandbox) -> None:
    sandbox.kill()
    if isinstance(sandbox.proc, ForkedProcess):
        sandbox.proc.close()  # no descriptor stays behind if nobody waits for it
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
    on_staged: Callable[[], None] | None = None,
) -> SandboxResult:
    """Run ``sql`` over ``tables`` (dataset name -> the pinned version's data) in a sandbox
    process of its own (from ``pool``, or started now). Returns the rows. Raises
    ``ValidationFailed`` (refused by the gate, a syntax error, a failed query, a limit exceeded:
    time, memory), ``NotFound`` (a name not granted: "dataset not found or not readable"),
    ``PayloadTooLarge`` (over ``max_bytes``), ``Unavailable`` (the sandbox could not run).

    ``s3``: how the sandbox reads pinned ``s3://`` objects (``trace_lite.query.s3``).
    ``on_staged`` is called once the sandbox's private copies of the local data are made (the
    caller may release what protected the originals).

    Tests only: ``keep_scratch`` leaves the private directory for inspection; ``gate=False``
    skips the sandbox's parse-level checks to show the lock-down and OS limits hold alone."""
    sandbox = await pool.take() if pool is not None else await _start(scratch_root)
    proc = sandbox.proc
    try:
        try:
            request: dict[str, Any] = {
                "sql": sql,
                "tables": await _staged(sandbox.scratch, tables),
                "threads": limits.threads,
                "memory_limit": limits.memory_limit,
                "max_rows": limits.max_rows,
                "max_bytes": limits.max_bytes,
                "cpu_s": int(limits.threads * limits.deadline_s) + 1,
                "gate": gate,
            }
            if s3 is not None:
                request["s3"] = s3
            if on_staged is not None:
                on_staged()
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
        if pool is not None:
            pool.fill()
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
    try:
        staged = await _staged(sandbox.scratch, tables)
    except BaseException:
        _discard(sandbox)
        await proc.wait()
        raise
    request: dict[str, Any] = {
        "mode": "arrow",
        "sql": sql,
        "tables": staged,
        "threads": limits.threads,
        "memory_limit": limits.memory_limit,
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
        if pool is not None:
            pool.fill()
