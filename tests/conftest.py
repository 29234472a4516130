"""Shared fixtures for every test layer.

* ``pg_cluster`` (session): the PostgreSQL server the tests use -- a private
  :class:`~trace_lite.embedded_pg.EmbeddedPostgres` under ``<repo>/.trace/test-pg`` (separate
  from the demo's ``.trace/pg``), or the server named by ``TRACE_TEST_DATABASE_URL`` (an
  admin URL, e.g. ``postgresql://postgres@localhost/postgres``) when that is set.
* ``_template_db`` (session): databases ``trace_template`` (state migrations) and
  ``trace_template_data`` (data migrations).  At session start they are dropped and rebuilt
  whenever the migration files (or ``migrate.py``) differ from the ones they were built from
  -- the fingerprint is kept as the database comment -- so schema changes are always picked
  up while a second test session running in the same checkout is not pulled out from under.
* ``db_url`` / ``data_db_url`` (function): a fresh database cloned from the matching
  template (``CREATE DATABASE ... TEMPLATE``), dropped ``WITH (FORCE)`` afterwards.
* ``db_url_factory``: ``make(kind="state" | "data") -> url`` for extra fresh databases.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

import psycopg
import pytest
from psycopg import sql

from trace_lite import migrate as migrate_module
from trace_lite.embedded_pg import EmbeddedPostgres, ExternalPostgres
from trace_lite.migrate import discover, migrate

REPO_ROOT = Path(__file__).resolve().parent.parent
TEST_CLUSTER_DIR = REPO_ROOT / ".trace" / "test-pg"
TEST_PORT = 5434
STATE_TEMPLATE = "trace_template"
DATA_TEMPLATE = "trace_template_data"

Cluster = EmbeddedPostgres | ExternalPostgres
DbKind = Literal["state", "data"]


@dataclass(frozen=True)
class TemplateDbs:
    state: str  # database name of the migrated state template
    data: str  # database name of the migrated data template
    migrations: tuple[str, ...]  # names of the migrations the templates contain


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Cluster]:
    external = os.environ.get("TRACE_TEST_DATABASE_URL")
    if external:
        yield ExternalPostgres(external).start()
        return
    cluster = EmbeddedPostgres(TEST_CLUSTER_DIR, port=TEST_PORT)
    TEST_CLUSTER_DIR.mkdir(parents=True, exist_ok=True)
    # Every session holds a shared lock; the last one out (exclusive lock granted) stops the
    # server, so concurrent sessions in one checkout share the cluster safely.
    with open(TEST_CLUSTER_DIR / ".sessions", "w") as sessions:
        fcntl.flock(sessions, fcntl.LOCK_SH)
        cluster.start()
        try:
            yield cluster
        finally:
            try:
                fcntl.flock(sessions, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pass  # another session still uses the server
            else:
                cluster.stop()


def _migrations_fingerprint() -> str:
    digest = hashlib.sha256()
    pkg = resources.files("trace_lite").joinpath("sql")
    for folder in ("migrations", "data_migrations"):
        for name, entry in discover(pkg / folder):
            digest.update(f"{folder}/{name}\0".encode())
            digest.update(entry.read_bytes())
    digest.update(Path(migrate_module.__file__).read_bytes())
    return digest.hexdigest()


def _template_fingerprint(conn: psycopg.Connection, name: str) -> str | None:
    row = conn.execute(
        "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s",
        [name],
    ).fetchone()
    return None if row is None else row[0]


@pytest.fixture(scope="session")
def _template_db(pg_cluster: Cluster) -> TemplateDbs:
    fingerprint = _migrations_fingerprint()
    with psycopg.connect(pg_cluster.admin_url(), autocommit=True) as admin:
        # Serialise template builds between concurrent sessions.
        admin.execute("SELECT pg_advisory_lock(hashtext('trace_test_template'))")
        current = [_template_fingerprint(admin, n) for n in (STATE_TEMPLATE, DATA_TEMPLATE)]
        if current != [fingerprint, fingerprint]:
            for name in (STATE_TEMPLATE, DATA_TEMPLATE):
                pg_cluster.drop_database(name)
                pg_cluster.create_database(name)
            migrate(pg_cluster.url(STATE_TEMPLATE), pg_cluster.url(DATA_TEMPLATE))
            for name in (STATE_TEMPLATE, DATA_TEMPLATE):
                admin.execute(
                    sql.SQL("COMMENT ON DATABASE {} IS {}").format(
                        sql.Identifier(name), sql.Literal(fingerprint)
                    )
                )
        admin.execute("SELECT pg_advisory_unlock(hashtext('trace_test_template'))")
    pkg = resources.files("trace_lite").joinpath("sql")
    names = [n for folder in ("migrations", "data_migrations") for n, _ in discover(pkg / folder)]
    return TemplateDbs(state=STATE_TEMPLATE, data=DATA_TEMPLATE, migrations=tuple(names))


@pytest.fixture
def db_url_factory(pg_cluster: Cluster, _template_db: TemplateDbs) -> Iterator[Callable[..., str]]:
    created: list[str] = []

    def make(kind: DbKind = "state") -> str:
        template = _template_db.state if kind == "state" else _template_db.data
        name = f"t_{uuid.uuid4().hex}"
        pg_cluster.create_database(name, template=template)
        created.append(name)
        return pg_cluster.url(name)

    yield make
    for name in reversed(created):
        pg_cluster.drop_database(name)


@pytest.fixture
def db_url(db_url_factory: Callable[..., str]) -> str:
    """A fresh, migrated state database (cloned from ``trace_template``)."""
    return db_url_factory("state")


@pytest.fixture
def data_db_url(db_url_factory: Callable[..., str]) -> str:
    """A fresh, migrated data database (cloned from ``trace_template_data``)."""
    return db_url_factory("data")


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A moto server process on loopback for the AWS adapters (boto3 speaks real HTTP to it);
    sets moto's dummy AWS credentials in this process's environment for the session."""
    from trace_aws.testing import MOTO_ENV, MotoServer

    saved = {k: os.environ.get(k) for k in MOTO_ENV}
    os.environ.update(MOTO_ENV)
    server = MotoServer(tmp_path_factory.mktemp("moto") / "moto.log").start()
    try:
        yield server
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
