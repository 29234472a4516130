"""The embedded PostgreSQL cluster and the migration runner against a real server."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from trace_lite import embedded_pg
from trace_lite.embedded_pg import EmbeddedPostgres, ExternalPostgres, default_database_urls
from trace_lite.migrate import migrate

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedPostgres]:
    """A throwaway cluster of our own: these tests restart and crash it."""
    base = REPO_ROOT / ".trace" / f"test-embedded-{os.getpid()}"
    pg = EmbeddedPostgres(base, port=5435)
    pg.start()
    try:
        yield pg
    finally:
        pg.destroy()


def _one(url: str, query: str) -> object:
    with psycopg.connect(url) as conn:
        row = conn.execute(query.encode()).fetchone()
        assert row is not None
        return row[0]


def test_server_runs_as_unprivileged_user(cluster: EmbeddedPostgres) -> None:
    pid = cluster.postmaster_pid()
    assert pid is not None
    uid = os.stat(f"/proc/{pid}").st_uid
    assert uid != 0
    assert os.stat(cluster.data_dir).st_uid == uid


def test_listens_on_unix_socket_only(cluster: EmbeddedPostgres) -> None:
    url = cluster.url("postgres")
    assert _one(url, "SHOW listen_addresses") == ""
    assert _one(url, "SHOW unix_socket_directories") == str(cluster.socket_dir)
    assert cluster.socket_path.exists()
    assert len(str(cluster.socket_path)) < 107
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(
            f"postgresql://postgres@127.0.0.1:{cluster.port}/postgres", connect_timeout=2
        )


def test_operational_defaults(cluster: EmbeddedPostgres) -> None:
    url = cluster.url("postgres")
    assert _one(url, "SHOW fsync") == "on"
    assert _one(url, "SHOW synchronous_commit") == "on"
    assert _one(url, "SHOW max_connections") == "200"
    assert _one(url, "SHOW shared_buffers") == "256MB"
    assert _one(url, "SHOW idle_in_transaction_session_timeout") == "1min"
    assert _one(url, "SHOW lock_timeout") == "5s"


def test_long_project_path_uses_short_socket_dir() -> None:
    open_dir = Path(tempfile.mkdtemp(prefix="trace-open-"))  # reachable by the server user
    try:
        open_dir.chmod(0o755)
        deep = open_dir / ("x" * 60) / ("y" * 60)
        pg = EmbeddedPostgres(deep, port=5436)
        assert pg.base_dir == deep
        assert pg.socket_dir.parent == Path("/tmp")
        assert len(str(pg.socket_path)) < 107
        assert pg.url("db").startswith("postgresql://postgres@/db?host=/tmp/trace-pg-")
    finally:
        shutil.rmtree(open_dir)


def test_start_is_idempotent(cluster: EmbeddedPostgres) -> None:
    pid = cluster.postmaster_pid()
    cluster.start()
    assert cluster.postmaster_pid() == pid
    # A second handle on the same folder reuses the running server.
    other = EmbeddedPostgres(cluster.base_dir, port=cluster.port).start()
    assert other.postmaster_pid() == pid


def test_data_survives_restart(cluster: EmbeddedPostgres) -> None:
    url = cluster.create_database("survive_restart")
    with psycopg.connect(url) as conn:
        conn.execute("CREATE TABLE t (v int)")
        conn.execute("INSERT INTO t VALUES (42)")
    old = cluster.postmaster_pid()
    cluster.restart()
    assert cluster.postmaster_pid() != old
    assert _one(url, "SELECT v FROM t") == 42


def test_kill9_then_start_recovers(cluster: EmbeddedPostgres) -> None:
    url = cluster.create_database("survive_crash")
    with psycopg.connect(url) as conn:
        conn.execute("CREATE TABLE t (v int)")
        conn.execute("INSERT INTO t VALUES (7)")  # committed: must survive the crash
    cluster.kill9()
    assert not cluster.is_running()
    cluster.start()
    assert cluster.is_running()
    assert _one(url, "SELECT v FROM t") == 7


def test_stop_then_start(cluster: EmbeddedPostgres) -> None:
    cluster.stop()
    assert not cluster.is_running()
    cluster.stop()  # no-op
    cluster.start()
    assert _one(cluster.url("postgres"), "SELECT 1") == 1


def test_create_and_drop_database(cluster: EmbeddedPostgres) -> None:
    url = cluster.create_database("dropme")
    assert cluster.create_database("dropme") == url  # exists: fine
    conn = psycopg.connect(url)  # an open session does not block the drop
    try:
        cluster.drop_database("dropme")
    finally:
        conn.close()
    assert (
        _one(cluster.url("postgres"), "SELECT count(*) FROM pg_database WHERE datname = 'dropme'")
        == 0
    )


# --------------------------------------------------------------------------- migrations


def _write_migrations(folder: Path, files: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


def test_migrate_twice_applies_nothing_second_time(
    tmp_path: Path, db_url_factory: Callable[..., str]
) -> None:
    state = _write_migrations(
        tmp_path / "state",
        {
            "0002_more.sql": "ALTER TABLE a ADD COLUMN note text DEFAULT '100%';",
            "0001_first.sql": "CREATE TABLE a (id int PRIMARY KEY);\nINSERT INTO a VALUES (1);",
            "0010_tenth.sql": "CREATE TABLE b (id int);",
            "README.txt": "ignored",
        },
    )
    data = _write_migrations(tmp_path / "data", {"0001_d.sql": "CREATE TABLE d (id int);"})
    state_url, data_url = db_url_factory("state"), db_url_factory("data")
    first = migrate(state_url, data_url, state_migrations=state, data_migrations=data)
    assert first == ["0001_first", "0002_more", "0010_tenth", "0001_d"]
    second = migrate(state_url, data_url, state_migrations=state, data_migrations=data)
    assert second == []
    assert _one(state_url, "SELECT note FROM a") == "100%"
    assert _one(state_url, "SELECT count(*) FROM trace_schema_migrations") >= 3


def test_failed_migration_rolls_back_alone(
    tmp_path: Path, db_url_factory: Callable[..., str]
) -> None:
    state = _write_migrations(
        tmp_path / "state",
        {
            "0001_ok.sql": "CREATE TABLE ok (id int);",
            "0002_bad.sql": "CREATE TABLE half (id int); SELECT no_such_function();",
        },
    )
    url = db_url_factory("state")
    with pytest.raises(psycopg.errors.UndefinedFunction):
        migrate(url, state_migrations=state)
    assert _one(url, "SELECT to_regclass('half') IS NULL") is True
    assert (
        _one(
            url,
            "SELECT count(*) FROM trace_schema_migrations WHERE name IN ('0001_ok', '0002_bad')",
        )
        == 1
    )


def test_concurrent_migrate_does_not_fail(tmp_path: Path, pg_cluster: object) -> None:
    assert isinstance(pg_cluster, EmbeddedPostgres | ExternalPostgres)
    name = "t_concurrent_migrate"
    pg_cluster.drop_database(name)
    url = pg_cluster.create_database(name)  # empty: no trace_schema_migrations table yet
    files = {
        f"{i:04d}_m.sql": f"CREATE TABLE m{i} (id int); SELECT pg_sleep(0.02);"
        for i in range(1, 11)
    }
    state = _write_migrations(tmp_path / "state", files)
    results: list[list[str]] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(migrate(url, state_migrations=state))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    try:
        assert errors == []
        applied = sorted(n for r in results for n in r)
        assert applied == sorted(n.removesuffix(".sql") for n in files)  # each exactly once
    finally:
        pg_cluster.drop_database(name)


def test_packaged_migrations_apply(db_url: str, data_db_url: str) -> None:
    # The templates were migrated with the packaged files: a clone has everything recorded.
    assert migrate(db_url, data_db_url) == []
    assert (
        _one(
            data_db_url,
            "SELECT count(*) FROM trace_schema_migrations WHERE name = '0001_data_init'",
        )
        == 1
    )
    assert _one(data_db_url, "SELECT count(*) FROM pg_namespace WHERE nspname = 'data'") == 1


def test_db_url_is_fresh_each_time(db_url_factory: Callable[..., str]) -> None:
    a, b = db_url_factory(), db_url_factory()
    assert a != b
    with psycopg.connect(a) as conn:
        conn.execute("CREATE TABLE only_in_a (id int)")
    assert _one(b, "SELECT to_regclass('only_in_a') IS NULL") is True


# --------------------------------------------------------------------------- default URLs


def test_default_database_urls_honours_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRACE_DATABASE_URL", "postgresql://u@h/state")
    monkeypatch.setenv("TRACE_DATA_DATABASE_URL", "postgresql://u@h/data")
    monkeypatch.setattr(embedded_pg, "EmbeddedPostgres", None)  # must not start anything
    assert default_database_urls() == ("postgresql://u@h/state", "postgresql://u@h/data")
    monkeypatch.delenv("TRACE_DATA_DATABASE_URL")
    assert default_database_urls() == ("postgresql://u@h/state", "postgresql://u@h/state")


def test_default_database_urls_starts_embedded(
    monkeypatch: pytest.MonkeyPatch, cluster: EmbeddedPostgres
) -> None:
    monkeypatch.delenv("TRACE_DATABASE_URL", raising=False)
    monkeypatch.delenv("TRACE_DATA_DATABASE_URL", raising=False)
    state_url, data_url = default_database_urls(cluster.base_dir, port=cluster.port)
    assert state_url == cluster.url("trace")
    assert data_url == cluster.url("trace_data")
    assert _one(state_url, "SELECT current_database()") == "trace"
    assert _one(data_url, "SELECT current_database()") == "trace_data"


@pytest.mark.skipif(os.geteuid() != 0, reason="the fallback applies when running as root")
def test_checkout_the_server_user_cannot_enter_gets_a_cluster_outside_it(tmp_path: Path) -> None:
    from trace_lite.embedded_pg import FALLBACK_ROOT

    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    private.chmod(0o700)
    cluster = EmbeddedPostgres(private / "project" / ".trace" / "pg")
    assert cluster.base_dir.parent == FALLBACK_ROOT
    # stable: the same checkout path always maps to the same cluster folder
    assert EmbeddedPostgres(private / "project" / ".trace" / "pg").base_dir == cluster.base_dir
    open_dir = Path(tempfile.mkdtemp(prefix="trace-open-"))
    try:
        open_dir.chmod(0o755)
        reachable = EmbeddedPostgres(open_dir / "pg")
        assert reachable.base_dir == (open_dir / "pg").absolute()
    finally:
        shutil.rmtree(open_dir)
