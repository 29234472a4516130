"""The sandbox process: one query, in a fresh DuckDB, after the lock-down, under OS limits.

Run by ``trace_lite.query.runner`` as ``python -I -m trace_lite.query.sandbox``, or forked by the
fork server (``trace_lite.query.forkserver``), which then runs ``serve`` as this module's
``main`` would; either way with an explicit minimal environment (no credentials), in a private
working directory, in its own session (killed at the deadline). It reads one JSON request on
stdin and answers on stdout: one JSON document, or (``mode: arrow``) frames carrying Arrow
record batches (``Frames``). The order of the layers:

1. OS limits first, before DuckDB is imported (``resource.setrlimit``): address space, no file
   may grow past 0 bytes (``RLIMIT_FSIZE``), few open files, no core dumps; then DuckDB is
   imported (pyarrow only for a stream) and the query's database opened (``connect``) while the
   process waits for its one request (a pool makes it before a query arrives); the request's
   CPU seconds become its CPU limit. Before the request is read, on x86_64 Linux, a seccomp
   filter (``trace_lite.query.nowrite``) leaves the process unable to open any file for writing
   or to create, rename or remove one (it holds on DuckDB's threads too); without it no query
   runs.
2. A fresh in-memory DuckDB with extension autoload/autoinstall off, community and unsigned
   extensions off, an empty extension directory, ``threads`` and ``memory_limit`` set, no
   temp directory (nothing spills; memory is a hard limit) and no progress bar (it would draw
   on stdout, the answer).
3. The gate (``trace_core.query_gate``) on DuckDB's own parse tree, with the exact granted names;
   and DuckDB's statement splitter must see one SELECT.
4. Trusted code names the granted datasets: views over this process's private copies of the
   pinned local data (Parquet, or the CSV export the server made of a Postgres-table dataset's
   pinned rows), by names relative to its working directory; ``s3://`` objects are loaded into
   in-memory tables through DuckDB's httpfs loaded by path, with a temporary secret scoped to
   the pinned prefixes, dropped once loaded (``trace_lite.query.s3``). This process never gets
   a database connection.
5. Lock-down, in this order: ``allowed_paths`` = the views' files, ``enable_external_access=false``
   (one-way), ``disabled_filesystems='LocalFileSystem'`` when no local file is read,
   ``lock_configuration=true``. From here no other file, URL, extension or setting is reachable
   from SQL even if the gate missed a construct.
6. The user SQL runs; at most ``max_rows`` rows are answered (``truncated`` says more existed)
   and the answer must fit ``max_bytes``. The process then exits at once (``os._exit``).
"""

from __future__ import annotations

import json
import os
import resource
import sys
from typing import Any, NoReturn

from trace_lite.query import nowrite
from trace_lite.query.values import jsonable

AS_LIMIT_BYTES = 3 * 1024**3
#: DuckDB threads of the database a sandbox opens before its request (``runner.Limits``'
#: default; a request asking for another number sets it).
DEFAULT_THREADS = 2
NOFILE_LIMIT = 256


def _limit(which: int, value: int) -> None:
    _soft, hard = resource.getrlimit(which)
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    resource.setrlimit(which, (value, value))


def apply_limits() -> None:
    """OS limits for this process, set before DuckDB loads; they cannot be raised again
    (soft == hard)."""
    _limit(resource.RLIMIT_AS, AS_LIMIT_BYTES)
    _limit(resource.RLIMIT_FSIZE, 0)
    _limit(resource.RLIMIT_NOFILE, NOFILE_LIMIT)
    _limit(resource.RLIMIT_CORE, 0)


def limit_cpu(cpu_s: int) -> None:
    """The query's CPU seconds (counted from this process's start), once the request names it."""
    _limit(resource.RLIMIT_CPU, cpu_s)


#: The answer when DuckDB's lock-down refuses an access (its own message names the path).
NO_ACCESS = "files, URLs, extensions and settings are not reachable from a query"


class Refused(Exception):
    """An answer that is not rows: ``code`` is a ``trace_core.errors`` code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def connect() -> Any:
    """Layer 2, made before the request arrives (a pool's sandbox waits with it): a fresh
    in-memory DuckDB for this process's one query, extensions and spilling off, the extension
    and secret directories an empty folder in this process's private working directory."""
    import duckdb

    private = "extensions"  # relative: an error naming it names no physical path
    con = duckdb.connect(
        ":memory:",
        config={
            "threads": DEFAULT_THREADS,
            "max_temp_directory_size": "0B",
            "temp_directory": "",
            "autoinstall_known_extensions": False,
            "autoload_known_extensions": False,
            "allow_community_extensions": False,
            "allow_unsigned_extensions": False,
            "extension_directory": private,
            "secret_directory": private,
            "allow_persistent_secrets": False,
        },
    )
    # DuckDB draws a progress bar on stdout for a slow query, and stdout is the answer
    con.execute("SET enable_progress_bar = false")
    return con


def prepare(con: Any, request: dict[str, Any]) -> Any:
    """Layers 2-5 on ``con`` (``connect``): the request's threads and memory, the gate, the
    trusted loading, the lock-down. Returns the locked connection, ready for the user SQL.
    Raises ``Refused``."""
    import duckdb

    from trace_core import errors, query_gate

    tables: dict[str, dict[str, Any]] = {t["name"]: t for t in request["tables"]}
    if int(request["threads"]) != DEFAULT_THREADS:
        con.execute(f"SET threads = {int(request['threads'])}")
    con.execute(f"SET memory_limit = {_quote(str(request['memory_limit']), chr(39))}")
    sql = str(request["sql"])
    ((tree,),) = con.execute("SELECT json_serialize_sql(?::VARCHAR)", [sql]).fetchall()
    parsed = json.loads(tree)
    used = frozenset(tables)
    if request.get("gate", True):
        try:
            used = query_gate.admit(parsed, tables)
        except errors.TraceError as exc:
            raise Refused(exc.code, exc.message) from None
        statements = con.extract_statements(sql)
        if len(statements) != 1 or statements[0].type.name != "SELECT":
            raise Refused("validation_failed", "send exactly one SELECT statement")
    s3 = request.get("s3")  # sent only when a pinned object is in S3
    if s3:
        _open_s3(con, s3)
    local: list[str] = []
    for name in sorted(used):
        try:
            local += _load(con, name, tables[name])
        except duckdb.Error:
            # the message names files: it stays in this process
            raise Refused("unavailable", "a dataset could not be loaded") from None
    if s3:
        # the credential leaves the database before any user SQL runs
        con.execute("DROP SECRET IF EXISTS trace_read")
    # the views' files (this process's private copies, by relative name) stay readable; no
    # other file, URL or setting is reachable from here on
    con.execute(f"SET allowed_paths = [{', '.join(_quote(f, chr(39)) for f in local)}]")
    con.execute("SET enable_external_access = false")
    if not local:
        con.execute("SET disabled_filesystems = 'LocalFileSystem'")
    con.execute("SET lock_configuration = true")
    return con


def run(con: Any, request: dict[str, Any]) -> dict[str, Any]:
    """One JSON answer: at most ``max_rows`` rows and whether more existed."""
    import duckdb

    con = prepare(con, request)
    max_rows = int(request["max_rows"])
    try:
        cur = con.execute(str(request["sql"]))
        columns = [d[0] for d in cur.description or []]
        types = [str(d[1]) for d in cur.description or []]
        fetched = cur.fetchmany(max_rows + 1)
    except duckdb.PermissionException:
        # the lock-down refused a file, URL, extension or setting (the gate lets none through);
        # DuckDB's message would repeat the path
        raise Refused("query_failed", NO_ACCESS) from None
    except duckdb.Error as exc:
        raise Refused("query_failed", _first_line(str(exc))) from None
    rows = [[jsonable(v) for v in row] for row in fetched[:max_rows]]
    return {
        "ok": True,
        "columns": columns,
        "types": types,
        "rows": rows,
        "truncated": len(fetched) > max_rows,
    }


#: Rows per Arrow record batch of a stream.
BATCH_ROWS = 8192


class Frames:
    """The stream answer's framing on stdout: one kind byte, a 4-byte big-endian length, the
    payload. ``H`` header (JSON: columns, types), ``S`` the Arrow schema message, ``B`` one
    Arrow record batch message, ``E`` the end (JSON: rows, truncated), ``X`` a refusal or a
    failure (JSON: error, message), possibly after batches."""

    def __init__(self, out: Any) -> None:
        self._out = out

    def send(self, kind: bytes, payload: bytes) -> None:
        self._out.write(kind + len(payload).to_bytes(4, "big") + payload)
        self._out.flush()

    def send_json(self, kind: bytes, value: dict[str, Any]) -> None:
        self.send(kind, json.dumps(value, separators=(",", ":"), allow_nan=False).encode())


def stream(con: Any, request: dict[str, Any], frames: Frames) -> None:
    """The user SQL's rows as Arrow record batches: at most ``max_rows`` rows (the end frame
    says whether more existed) and ``max_bytes`` of batches. A failure before the first frame
    raises ``Refused``; after it, it is sent as an ``X`` frame."""
    import duckdb
    import pyarrow as pa

    con = prepare(con, request)
    max_rows, max_bytes = int(request["max_rows"]), int(request["max_bytes"])
    try:
        cur = con.execute(str(request["sql"]))
        reader = cur.fetch_record_batch(BATCH_ROWS)
        columns = [d[0] for d in cur.description or []]
        types = [str(d[1]) for d in cur.description or []]
        batch = _next_batch(reader)
    except duckdb.PermissionException:
        raise Refused("query_failed", NO_ACCESS) from None
    except (duckdb.Error, pa.ArrowException, OSError) as exc:  # DuckDB errors via Arrow
        raise Refused("query_failed", _first_line(str(exc))) from None
    # dictionary-encoded columns (ENUM) as their values: every batch stands alone
    schema = pa.schema(
        f.with_type(f.type.value_type) if pa.types.is_dictionary(f.type) else f
        for f in reader.schema
    )
    frames.send_json(b"H", {"columns": columns, "types": types})
    frames.send(b"S", schema.serialize().to_pybytes())
    rows = size = 0
    truncated = False
    try:
        while batch is not None:
            if batch.num_rows:
                if rows == max_rows:
                    truncated = True
                    break
                part = batch.slice(0, max_rows - rows)
                if part.schema != schema:
                    part = part.cast(schema)
                data = part.serialize().to_pybytes()
                size += len(data)
                if size > max_bytes:
                    frames.send_json(
                        b"X", {"error": "payload_too_large", "message": "the result is too large"}
                    )
                    return
                frames.send(b"B", data)
                rows += part.num_rows
                if part.num_rows < batch.num_rows:
                    truncated = True
                    break
            batch = _next_batch(reader)
    except (duckdb.Error, pa.ArrowException, OSError) as exc:
        frames.send_json(b"X", {"error": "query_failed", "message": _first_line(str(exc))})
        return
    frames.send_json(b"E", {"rows": rows, "truncated": truncated})


def _next_batch(reader: Any) -> Any:
    try:
        return reader.read_next_batch()
    except StopIteration:
        return None


def _open_s3(con: Any, s3: dict[str, Any]) -> None:
    """Trusted set-up for S3 objects, before the lock-down: DuckDB's signed httpfs loaded by
    path (the ``duckdb-ext-httpfs`` wheel; never downloaded) and a temporary secret scoped to
    the pinned prefixes, dropped again once the tables are loaded."""
    con.execute(f"LOAD {_quote(str(s3['httpfs']), chr(39))}")
    options = {
        "KEY_ID": s3["key_id"],
        "SECRET": s3["secret"],
        "REGION": s3["region"],
        "URL_STYLE": s3.get("url_style", "vhost"),
        "USE_SSL": "true" if s3.get("use_ssl", True) else "false",
    }
    if s3.get("session_token"):
        options["SESSION_TOKEN"] = s3["session_token"]
    if s3.get("endpoint"):
        options["ENDPOINT"] = s3["endpoint"]
    spec = ", ".join(
        f"{k} {v if k == 'USE_SSL' else _quote(str(v), chr(39))}" for k, v in options.items()
    )
    scope = ", ".join(_quote(str(p), chr(39)) for p in s3["scope"])
    con.execute(f"CREATE TEMPORARY SECRET trace_read (TYPE S3, {spec}, SCOPE [{scope}])")


#: Column types a Postgres-table dataset's export may declare (``trace_lite.query.service``).
CSV_TYPES = frozenset(
    {
        "SMALLINT",
        "INTEGER",
        "BIGINT",
        "FLOAT",
        "DOUBLE",
        "BOOLEAN",
        "VARCHAR",
        "DATE",
        "TIMESTAMP",
        "TIMESTAMPTZ",
        "UUID",
    }
)


def _quote(text: str, mark: str) -> str:
    return mark + text.replace(mark, mark * 2) + mark


def _load(con: Any, name: str, source: dict[str, Any]) -> list[str]:
    """Trusted loading, before the lock-down: a dataset named after it. Local data (this
    process's private copies, by names relative to its working directory) becomes a view over
    the files, read where they lie; ``s3://`` objects are copied into an in-memory table (a
    view would need the secret at query time). Returns the local files the views read."""
    ident = _quote(name, '"')
    if "csv" in source:
        columns = [(str(c), str(t)) for c, t in source["columns"]]
        if not columns:
            con.execute(f"CREATE TABLE {ident} (_empty BOOLEAN)")
            return []
        if any(t not in CSV_TYPES for _, t in columns):
            raise Refused("validation_failed", "unsupported column type")
        path = str(source["csv"])
        spec = ", ".join(f"{_quote(c, chr(39))}: {_quote(t, chr(39))}" for c, t in columns)
        con.execute(
            f"CREATE VIEW {ident} AS SELECT * FROM read_csv({_quote(path, chr(39))}, "
            f"header = false, auto_detect = false, delim = ',', quote = '\"', escape = '\"', "
            f"allow_quoted_nulls = false, columns = {{{spec}}})"
        )
        return [path]
    files = [str(f) for f in source["parquet"]]
    if not files:
        con.execute(f"CREATE TABLE {ident} (_empty BOOLEAN)")
        return []
    if any(f.startswith("s3://") for f in files):
        con.execute(f"CREATE TABLE {ident} AS SELECT * FROM read_parquet(?)", [files])
        return []
    listed = ", ".join(_quote(f, chr(39)) for f in files)
    con.execute(f"CREATE VIEW {ident} AS SELECT * FROM read_parquet([{listed}])")
    return files


def _first_line(message: str) -> str:
    return message.splitlines()[0][:500] if message else "query failed"


def serve(con: Any) -> NoReturn:
    """Read this process's one request on stdin, answer it on stdout over ``con``
    (``connect``), and end the process. Before the request is read, the no-write filter
    (``nowrite``) is installed where the machine has it; if it cannot be, no query runs (the
    server may have linked the store's files into this process's directory)."""
    locked = True
    if nowrite.AVAILABLE:
        try:
            nowrite.install()
        except nowrite.FilterError:
            locked = False
    request = json.loads(sys.stdin.buffer.read())
    if not locked:
        _answer_refusal(
            request, Refused("unavailable", "the query sandbox could not be locked down")
        )
    limit_cpu(int(request["cpu_s"]))
    if request.get("mode") == "arrow":
        frames = Frames(sys.stdout.buffer)
        try:
            stream(con, request, frames)
        except Refused as exc:
            frames.send_json(b"X", {"error": exc.code, "message": exc.message})
        except MemoryError:
            frames.send_json(b"X", {"error": "query_failed", "message": "out of memory"})
        _exit()
    try:
        answer = run(con, request)
    except Refused as exc:
        answer = {"ok": False, "error": exc.code, "message": exc.message}
    except MemoryError:
        answer = {"ok": False, "error": "query_failed", "message": "out of memory"}
    data = json.dumps(answer, separators=(",", ":"), allow_nan=False).encode()
    if len(data) > int(request["max_bytes"]):
        data = json.dumps(
            {"ok": False, "error": "payload_too_large", "message": "the result is too large"}
        ).encode()
    sys.stdout.buffer.write(data)
    _exit()


def _answer_refusal(request: dict[str, Any], exc: Refused) -> NoReturn:
    answer = {"ok": False, "error": exc.code, "message": exc.message}
    if request.get("mode") == "arrow":
        Frames(sys.stdout.buffer).send_json(b"X", {"error": exc.code, "message": exc.message})
    else:
        sys.stdout.buffer.write(json.dumps(answer).encode())
    _exit()


def main() -> NoReturn:
    apply_limits()
    # A pre-started sandbox waits on stdin with DuckDB imported and its query's fresh database
    # open (the slow part of starting). pyarrow (~40 ms of CPU) is imported only for an Arrow
    # stream, once the request asks for one.
    from trace_core import query_gate  # noqa: F401

    serve(connect())


def _exit() -> NoReturn:
    """End at once once the answer is out: the parent waits for this process to exit, and the
    interpreter's and DuckDB's orderly teardown took longer than most queries (nothing else
    needs flushing: the process writes no file)."""
    sys.stdout.buffer.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
