"""The Query Service sandbox under attack: every escape attempt is refused AND leaks nothing
AND writes nothing.

Each case runs in a real sandbox process over a real Parquet file. ``SECRET`` sits in a file
next to the data and in the parent's environment; no answer or error may contain it, the
data's path, or the scratch directory's path; the canary paths the attempts try to write must
not exist afterwards and the sandbox's private directory holds nothing but its unchanged copy of
the granted data. Cases marked ``lockdown``
are run a second time with the parse-level gate switched off, to show the DuckDB lock-down and
the OS limits refuse them on their own.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import attrs
import duckdb
import pytest

from trace_core import errors
from trace_lite.query import Limits, SandboxPool, TableSource, run_sandboxed

SECRET = "CANARY-7c1d0e-SECRET"
FAST = Limits(deadline_s=20.0)


@attrs.frozen
class Case:
    id: str
    sql: str
    lockdown: bool = False


def _cases() -> list[Case]:
    c = Case
    return [
        # extensions
        c("load_httpfs", "LOAD httpfs", True),
        c("install_httpfs", "INSTALL httpfs", True),
        c("force_install", "FORCE INSTALL postgres FROM core", True),
        c("load_path", "LOAD '{tmp}/evil.duckdb_extension'", True),
        c("extensions_list", "SELECT * FROM duckdb_extensions()"),
        c("select_then_load", "SELECT * FROM blocks; LOAD httpfs", True),
        # local files: read
        c("read_text", "SELECT * FROM read_text('{secret}')", True),
        c("read_blob", "SELECT * FROM read_blob('{secret}')", True),
        c("read_csv", "SELECT * FROM read_csv('{secret}')", True),
        c("read_csv_auto", "SELECT * FROM read_csv_auto('{secret}')", True),
        c("replacement_scan", "SELECT * FROM '{secret}'", True),
        c("read_granted_path", "SELECT * FROM read_parquet('{data}')", True),
        c("parquet_scan_other", "SELECT * FROM parquet_scan('{other}')", True),
        c("read_json", "SELECT * FROM read_json('{secret}')", True),
        c("glob", "SELECT * FROM glob('{tmp}/*')"),
        c("parquet_metadata", "SELECT * FROM parquet_metadata('{data}')", True),
        c("parquet_schema", "SELECT * FROM parquet_schema('{data}')", True),
        # the sandbox's private copy of the granted data, which its view reads by relative name
        c("read_staged_copy", "SELECT * FROM read_parquet('data/0_0.parquet')"),
        c(
            "staged_path_traversal",
            "SELECT * FROM read_text('data/0_0.parquet/../../../../secret.csv')",
            True,
        ),
        c("staged_dir_glob", "SELECT * FROM read_parquet('data/*.parquet')"),
        c("overwrite_staged_copy", "COPY (SELECT 1) TO 'data/0_0.parquet' (USE_TMP_FILE false)"),
        c("allowed_paths_setting", "SELECT current_setting('allowed_paths')"),
        c("sniff_csv", "SELECT * FROM sniff_csv('{secret}')", True),
        c(
            "union_other",
            "SELECT * FROM blocks UNION ALL SELECT * FROM read_parquet('{other}')",
            True,
        ),
        c("scalar_subquery_read", "SELECT (SELECT content FROM read_text('{secret}'))", True),
        c(
            "in_subquery_read",
            "SELECT * FROM blocks WHERE s IN (SELECT * FROM read_csv('{secret}'))",
            True,
        ),
        c("cte_read", "WITH x AS (SELECT * FROM read_text('{secret}')) SELECT * FROM x", True),
        c(
            "lateral_read",
            "SELECT * FROM blocks, LATERAL (SELECT * FROM read_text('{secret}'))",
            True,
        ),
        # local files: write, temp and spill locations
        c("copy_to", "COPY blocks TO '{written}'", True),
        c("copy_query_to", "COPY (SELECT 1) TO '{written}' (FORMAT parquet)", True),
        c("export_database", "EXPORT DATABASE '{written}'", True),
        c("import_database", "IMPORT DATABASE '{tmp}'", True),
        c("create_table", "CREATE TABLE x AS SELECT 1"),
        c("insert", "INSERT INTO blocks VALUES (1, 'a')"),
        c("create_view_read", "CREATE VIEW v AS SELECT * FROM read_text('{secret}')", True),
        c("set_temp_directory", "SET temp_directory = '{written}'", True),
        c("checkpoint", "CHECKPOINT"),
        c("attach_file", "ATTACH '{written}' AS w", True),
        # URLs
        c("http_parquet", "SELECT * FROM read_parquet('http://127.0.0.1:9/x.parquet')", True),
        c("https_replacement", "SELECT * FROM 'https://127.0.0.1:9/x.csv'", True),
        c("s3_csv", "SELECT * FROM read_csv('s3://bucket/x.csv')", True),
        c(
            "metadata_url",
            "SELECT * FROM read_text('http://169.254.169.254/latest/meta-data/')",
            True,
        ),
        # ATTACH
        c("attach_postgres", "ATTACH 'dbname=postgres host=127.0.0.1' AS pg (TYPE postgres)", True),
        c("attach_memory", "ATTACH ':memory:' AS m"),
        c("attach_sqlite", "ATTACH '{secret}' AS s (TYPE sqlite)", True),
        c("use_other", "USE system"),
        # settings
        c("enable_external_access", "SET enable_external_access = true", True),
        c("reset_external_access", "RESET enable_external_access", True),
        c("unlock_configuration", "SET lock_configuration = false", True),
        c("profiling_output", "PRAGMA profiling_output = '{written}'", True),
        c("threads", "SET threads = 64", True),
        c("memory_limit", "SET memory_limit = '100GB'", True),
        c("set_variable", "SET VARIABLE x = 1"),
        c("call_pragma", "CALL pragma_version()"),
        c("pragma_database_list", "PRAGMA database_list"),
        # secrets
        c("create_secret", "CREATE SECRET s (TYPE s3, KEY_ID 'a', SECRET 'b', ENDPOINT 'x')"),
        c(
            "persistent_secret",
            "CREATE PERSISTENT SECRET p (TYPE s3, KEY_ID 'a', SECRET 'b')",
            True,
        ),
        c("which_secret", "SELECT * FROM which_secret('s3://x/y', 's3')"),
        c("duckdb_secrets", "SELECT * FROM duckdb_secrets()"),
        c("drop_secret", "DROP SECRET s"),
        # table functions that open connections or run SQL
        c(
            "postgres_scan",
            "SELECT * FROM postgres_scan('dbname=postgres', 'public', 'orgs')",
            True,
        ),
        c("postgres_query", "SELECT * FROM postgres_query('dbname=postgres', 'SELECT 1')", True),
        c("sqlite_scan", "SELECT * FROM sqlite_scan('{secret}', 't')", True),
        c("query_fn", "SELECT * FROM query('SELECT 1')"),
        c("query_table_fn", "SELECT * FROM query_table('blocks')"),
        c(
            "execute_serialized",
            "SELECT json_execute_serialized_sql(json_serialize_sql('SELECT 1'))",
        ),
        # catalog functions and names revealing physical names or paths
        c("duckdb_settings", "SELECT * FROM duckdb_settings()"),
        c("duckdb_databases", "SELECT * FROM duckdb_databases()"),
        c("duckdb_views", "SELECT * FROM duckdb_views()"),
        c("duckdb_tables_view", "SELECT * FROM duckdb_tables"),
        c("information_schema", "SELECT * FROM information_schema.tables"),
        c("pg_settings", "SELECT * FROM pg_catalog.pg_settings"),
        c("sqlite_master", "SELECT * FROM sqlite_master"),
        c("pragma_view", "SELECT * FROM pragma_database_list"),
        c("current_setting", "SELECT current_setting('extension_directory')"),
        c("getenv", "SELECT getenv('TRACE_QUERY_CANARY')"),
        c("pg_get_viewdef", "SELECT pg_get_viewdef('blocks')"),
        c(
            "cte_shadow_self",
            "WITH duckdb_settings AS (SELECT * FROM duckdb_settings) SELECT * FROM duckdb_settings",
        ),
        c(
            "cte_out_of_scope",
            "SELECT * FROM (WITH duckdb_settings AS (SELECT 1) SELECT 1), duckdb_settings",
        ),
        c("qualified_main", "SELECT * FROM main.blocks"),
        c("qualified_catalog", "SELECT * FROM memory.main.blocks"),
        c("system_catalog", "SELECT * FROM system.main.duckdb_settings"),
        c("describe", "DESCRIBE blocks"),
        c("summarize", "SUMMARIZE blocks"),
        c("show_tables", "SHOW ALL TABLES"),
        # multiple statements and empty input
        c("two_selects", "SELECT 1; SELECT 2"),
        c("select_then_copy", "SELECT * FROM blocks; COPY blocks TO '{written}'", True),
        c("select_then_attach", "SELECT 1; ATTACH '{written}' AS w", True),
        c("empty", ""),
        c("comment_only", "-- nothing"),
        # data not granted: another dataset, another version
        c("not_granted", "SELECT * FROM logs"),
        c("time_travel", "SELECT * FROM blocks AT (VERSION => 1)"),
    ]


CASES = _cases()


@attrs.frozen
class Paths:
    tmp: Path
    secret: Path
    data: Path
    other: Path
    written: Path
    scratch: Path

    def sql(self, template: str) -> str:
        return template.format(
            tmp=self.tmp, secret=self.secret, data=self.data, other=self.other, written=self.written
        )


@pytest.fixture
def paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Paths]:
    monkeypatch.setenv("TRACE_QUERY_CANARY", SECRET)
    secret = tmp_path / "secret.csv"
    secret.write_text(f"k\n{SECRET}\n")
    data = tmp_path / "data.parquet"
    other = tmp_path / "other.parquet"
    duckdb.sql(f"COPY (SELECT range AS n, 'row' || range AS s FROM range(5)) TO '{data}'")
    duckdb.sql(f"COPY (SELECT '{SECRET}' AS s) TO '{other}'")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    yield Paths(tmp_path, secret, data, other, tmp_path / "written", scratch)


def _assert_nothing_leaked_or_written(p: Paths, text: str) -> None:
    assert SECRET not in text
    assert str(p.tmp) not in text
    assert not p.written.exists()
    assert sorted(x.name for x in p.tmp.iterdir()) == [
        "data.parquet",
        "other.parquet",
        "scratch",
        "secret.csv",
    ]
    granted = p.data.read_bytes()
    for d in p.scratch.iterdir():
        # each sandbox's private directory holds nothing but its copy of the granted data,
        # unchanged (its views read the copy; a write the lock-down missed would show here)
        assert [x.name for x in d.iterdir()] in ([], ["data"]), list(d.iterdir())
        for copy in (d / "data").glob("*"):
            assert copy.name == "0_0.parquet" and copy.read_bytes() == granted


async def _attempt(p: Paths, case: Case, *, gate: bool) -> str:
    try:
        result = await run_sandboxed(
            p.sql(case.sql),
            {"blocks": [str(p.data)]},
            FAST,
            scratch_root=p.scratch,
            keep_scratch=True,
            gate=gate,
        )
    except (errors.ValidationFailed, errors.NotFound) as exc:
        assert exc.field == "sql"
        return exc.message
    pytest.fail(f"{case.id} was not refused: {result}")


def test_the_suite_has_at_least_sixty_attempts() -> None:
    assert len(CASES) >= 60
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
async def test_escape_attempt_is_refused(paths: Paths, case: Case) -> None:
    message = await _attempt(paths, case, gate=True)
    _assert_nothing_leaked_or_written(paths, message)


LOCKDOWN = [c for c in CASES if c.lockdown]


@pytest.mark.parametrize("case", LOCKDOWN, ids=[c.id for c in LOCKDOWN])
async def test_lockdown_alone_refuses(paths: Paths, case: Case) -> None:
    """The same attempt with the sandbox's parse-level checks off: DuckDB's lock-down (or an
    OS limit) still refuses it, and nothing leaks or is written."""
    message = await _attempt(paths, case, gate=False)
    _assert_nothing_leaked_or_written(paths, message)


async def test_unknown_names_get_one_message_naming_none(paths: Paths) -> None:
    messages = {
        await _attempt(paths, Case("x", sql), gate=True)
        for sql in (
            "SELECT * FROM logs",
            "SELECT * FROM secret_dataset_name",
            "SELECT * FROM main.blocks",
        )
    }
    assert messages == {"dataset not found or not readable"}


async def test_syntax_error_names_its_position(paths: Paths) -> None:
    message = await _attempt(paths, Case("x", "SELECT n FROM blocks WHERE"), gate=True)
    assert message.startswith("syntax error at position ")


async def test_granted_dataset_is_readable(paths: Paths) -> None:
    r = await run_sandboxed(
        "WITH b AS (SELECT * FROM blocks) SELECT count(*) AS n, max(s) AS s FROM b",
        {"blocks": [str(paths.data)]},
        FAST,
    )
    assert (r.columns, r.rows, r.truncated) == (["n", "s"], [[5, "row4"]], False)


# --- resource exhaustion -----------------------------------------------------------------------

TIGHT = Limits(deadline_s=4.0, max_rows=100, max_bytes=1024 * 1024, memory_limit="256MB")


@pytest.mark.parametrize(
    "sql",
    [
        # unbounded recursive CTE: the deadline kills the process group
        "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT count(*) FROM r",
        # cartesian product of 10^12 rows
        "WITH t AS (SELECT * FROM (VALUES (1),(2),(3),(4),(5),(6),(7),(8),(9),(10)) v(x)) "
        "SELECT count(*) FROM t a, t b, t c, t d, t e, t f, t g, t h, t i, t j, t k, t l",
        # a huge string, and a huge aggregate of strings: over the memory limit
        "SELECT length(repeat('x', 2000000000))",
        "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 3000) "
        "SELECT length(string_agg(repeat('x', 1000000), '')) FROM r",
        # a huge list
        "SELECT len(range(2000000000))",
    ],
    ids=["recursive_cte", "cartesian", "huge_string", "huge_aggregate", "huge_list"],
)
async def test_resource_exhaustion_is_stopped(paths: Paths, sql: str) -> None:
    with pytest.raises(errors.ValidationFailed) as info:
        await run_sandboxed(sql, {}, TIGHT, scratch_root=paths.scratch, keep_scratch=True)
    _assert_nothing_leaked_or_written(paths, info.value.message)
    assert _processes_in(paths.scratch) == []  # the sandbox is gone, not orphaned


def _processes_in(root: Path) -> list[int]:
    """Processes whose working directory is under ``root`` (each sandbox runs in its own)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cwd = os.readlink(proc / "cwd")
            except OSError:
                continue
            if cwd.startswith(str(root)):
                found.append(int(proc.name))
    return found


async def test_huge_result_is_capped_at_max_rows(paths: Paths) -> None:
    r = await run_sandboxed(
        "WITH t AS (SELECT * FROM (VALUES (1),(2),(3),(4),(5),(6),(7),(8),(9),(10)) v(x)) "
        "SELECT a.x FROM t a, t b, t c, t d, t e",
        {},
        TIGHT,
    )
    assert (len(r.rows), r.truncated) == (100, True)


async def test_huge_result_bytes_are_refused(paths: Paths) -> None:
    with pytest.raises(errors.PayloadTooLarge):
        await run_sandboxed(
            "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 50) "
            "SELECT repeat('x', 100000) FROM r",
            {},
            TIGHT,
        )


def test_sandbox_environment_carries_no_credentials() -> None:
    from trace_lite.query.runner import _environment

    assert _environment(Path("/x")) == {
        "PATH": "/usr/bin:/bin",
        "LC_ALL": "C.UTF-8",
        "HOME": "/x",
        "TMPDIR": "/x",
    }


async def test_a_pool_gives_each_query_its_own_pre_started_sandbox(paths: Paths) -> None:
    pool = SandboxPool(2, scratch_root=paths.scratch)
    pool.fill()
    try:
        first = await pool.take()  # a process is given out once: taking it removes it
        first.kill()
        await first.proc.wait()
        shutil.rmtree(first.scratch)  # the taker's to clean up, as run_sandboxed does
        tables: dict[str, TableSource] = {"blocks": [str(paths.data)]}
        r = await run_sandboxed("SELECT count(*) FROM blocks", tables, FAST, pool=pool)
        assert r.rows == [[5]]
        message = await _attempt_in_pool(paths, pool)
        _assert_nothing_leaked_or_written(paths, message)
        assert first.proc.pid not in _processes_in(paths.scratch)
    finally:
        await pool.close()
    assert _processes_in(paths.scratch) == []  # idle sandboxes are killed on close
    assert list(paths.scratch.iterdir()) == []


async def _attempt_in_pool(paths: Paths, pool: SandboxPool) -> str:
    with pytest.raises(errors.ValidationFailed) as info:
        await run_sandboxed(
            f"SELECT * FROM read_text('{paths.secret}')", {}, FAST, pool=pool, gate=False
        )
    return info.value.message


async def test_the_pool_hands_each_query_a_process_that_never_served_one(paths: Paths) -> None:
    pool = SandboxPool(2, scratch_root=paths.scratch)
    tables: dict[str, TableSource] = {"blocks": [str(paths.data)]}
    served: list[int] = []
    try:
        for _ in range(4):
            await pool.ready()
            waiting = pool.idle_pids()
            assert len(waiting) == 2 and not set(waiting) & set(served)
            r = await run_sandboxed("SELECT count(*) FROM blocks", tables, FAST, pool=pool)
            assert r.rows == [[5]]
            served.append(waiting[0])  # the longest-waiting one is given out
            assert waiting[0] not in pool.idle_pids()
            assert waiting[0] not in _processes_in(paths.scratch)  # gone once it answered
        assert len(set(served)) == 4
    finally:
        await pool.close()
    assert _processes_in(paths.scratch) == []


def _pidfds() -> int:
    """pidfds this process holds (one per forked sandbox it has not let go of)."""
    held = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            held += "pidfd" in os.readlink(f"/proc/self/fd/{fd}")
        except FileNotFoundError:  # the descriptor that listed the folder
            pass
    return held


async def test_a_killed_pool_process_is_replaced_not_handed_out(paths: Paths) -> None:
    pool = SandboxPool(2, scratch_root=paths.scratch)
    tables: dict[str, TableSource] = {"blocks": [str(paths.data)]}
    held = _pidfds()
    try:
        await pool.ready()
        dead = pool.idle_pids()[0]
        os.kill(dead, signal.SIGKILL)
        _wait_until_dead(dead)  # without yielding: asyncio has not noticed the death yet
        taken = await pool.take()
        assert taken.proc.pid != dead
        taken.kill()
        await taken.proc.wait()
        shutil.rmtree(taken.scratch)
        r = await run_sandboxed("SELECT count(*) FROM blocks", tables, FAST, pool=pool)
        assert r.rows == [[5]]
        await pool.ready()
        assert dead not in pool.idle_pids() and len(pool.idle_pids()) == 2
        assert _pidfds() == held + 2  # the dead one's was let go of when it was discarded
    finally:
        await pool.close()
    assert _pidfds() == held
    assert _processes_in(paths.scratch) == []
    assert list(paths.scratch.iterdir()) == []


def _wait_until_dead(pid: int) -> None:
    """Block until the kernel reports the process ended, as the pool sees it: its pidfd turns
    readable once the whole thread group has exited. (A ``Z`` in ``/proc/{pid}/stat`` is not
    enough: the group leader shows it while DuckDB's other threads are still exiting.)"""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return  # already reaped
    try:
        ready, _, _ = select.select([pidfd], [], [], 30)
        assert ready, f"process {pid} did not end within 30 s of SIGKILL"
    finally:
        os.close(pidfd)


async def test_the_lockdown_never_lets_a_write_reach_the_stores_files(paths: Paths) -> None:
    """With the gate off: the views' files are allowed paths DuckDB could write, so they are the
    sandbox's private copies; overwriting them is stopped by the file-size limit and never
    reaches the store's files; no other file (a new one beside them, the store's own path) is
    reachable."""
    tables: dict[str, TableSource] = {"blocks": [str(paths.data)], "logs": [str(paths.other)]}
    before = (paths.data.read_bytes(), paths.other.read_bytes())
    for sql in (
        "COPY (SELECT 1) TO 'data/0_0.parquet' (USE_TMP_FILE false)",
        "COPY (SELECT 1) TO 'data/1_0.parquet' (FORMAT csv, USE_TMP_FILE false)",
        "COPY (SELECT 1) TO 'data/new.parquet'",
        f"COPY (SELECT 1) TO '{paths.data}' (USE_TMP_FILE false)",
        f"SELECT * FROM blocks, read_parquet('{paths.data}')",
    ):
        with pytest.raises(errors.ValidationFailed) as info:
            await run_sandboxed(sql, tables, FAST, scratch_root=paths.scratch, gate=False)
        assert SECRET not in info.value.message and str(paths.tmp) not in info.value.message
    assert (paths.data.read_bytes(), paths.other.read_bytes()) == before
    assert not paths.written.exists()
    assert list(paths.scratch.iterdir()) == []


def _fds(pid: int) -> list[str]:
    return sorted(os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd"))


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if item)


async def test_a_forked_sandbox_holds_only_its_pipes_and_no_credentials(paths: Paths) -> None:
    """The fork server's control socket is not inherited: a pooled sandbox holds its three
    pipes (and whatever DuckDB opened), no socket; its environment, and the fork server's, is
    the minimal one (the canary in this process's environment is in neither)."""
    pool = SandboxPool(2, scratch_root=paths.scratch)
    try:
        await pool.ready()
        forks = pool.fork_server_pid
        assert forks is not None
        assert any(link.startswith("socket:") for link in _fds(forks))  # it has one; they don't
        for pid in pool.idle_pids():
            links = _fds(pid)
            assert not [link for link in links if link.startswith("socket:")], links
            assert [os.readlink(f"/proc/{pid}/fd/{fd}")[:5] for fd in (0, 1, 2)] == ["pipe:"] * 3
            assert os.getsid(pid) == pid != os.getsid(forks)  # its own session: killed alone
        for pid in [forks, *pool.idle_pids()]:
            env = _environ(pid)
            assert set(env) == {"PATH", "LC_ALL", "HOME", "TMPDIR"}, env
            assert SECRET not in repr(env)
        tables: dict[str, TableSource] = {"blocks": [str(paths.data)]}
        r = await run_sandboxed("SELECT count(*) FROM blocks", tables, FAST, pool=pool)
        assert r.rows == [[5]]
    finally:
        await pool.close()
    assert _processes_in(paths.scratch) == []  # the fork server and its sandboxes are gone
    assert list(paths.scratch.iterdir()) == []


async def test_a_dead_fork_server_is_replaced_and_its_sandboxes_still_serve(paths: Paths) -> None:
    pool = SandboxPool(2, scratch_root=paths.scratch)
    tables: dict[str, TableSource] = {"blocks": [str(paths.data)]}
    try:
        await pool.ready()
        dead = pool.fork_server_pid
        assert dead is not None
        os.kill(dead, signal.SIGKILL)
        _wait_until_dead(dead)
        for _ in range(4):  # the two it forked (orphans now), then sandboxes of a new one
            r = await run_sandboxed("SELECT count(*) FROM blocks", tables, FAST, pool=pool)
            assert r.rows == [[5]]
        await pool.ready()
        assert pool.fork_server_pid not in (None, dead)
    finally:
        await pool.close()
    assert _processes_in(paths.scratch) == []
