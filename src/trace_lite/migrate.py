"""Apply Trace Lite's SQL migrations.

State migrations live in ``trace_lite/sql/migrations/NNNN_*.sql`` and data migrations in
``trace_lite/sql/data_migrations/NNNN_*.sql``.  Each file runs in its own transaction, in
numeric order, and is recorded in ``trace_schema_migrations`` of the database it ran in.
Every transaction first takes a transaction-scoped advisory lock, so concurrent runs (two
workers starting at once) serialise and each migration is applied exactly once.

Files may hold several statements; they run through the simple query protocol (no
parameters), so statements that refuse to run inside a transaction block (``CREATE INDEX
CONCURRENTLY``, ``ALTER TYPE ... ADD VALUE`` before PG 12) are not supported.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

import psycopg

__all__ = ["MIGRATIONS_TABLE", "apply_migrations", "discover", "migrate"]

MIGRATIONS_TABLE = "trace_schema_migrations"
# pg_advisory_xact_lock key shared by every migrator ("trace-mg" as a big-endian int64).
_LOCK_KEY = int.from_bytes(b"trace-mg", "big") & 0x7FFF_FFFF_FFFF_FFFF
_FILE = re.compile(r"^(\d+)_[A-Za-z0-9_.-]+\.sql$")

_CREATE_TABLE = b"""
CREATE TABLE IF NOT EXISTS trace_schema_migrations (
    name text PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""

Source = Traversable | Path | str


def _as_dir(source: Source) -> Traversable:
    if isinstance(source, str):
        return Path(source)
    return source


def discover(source: Source) -> list[tuple[str, Traversable]]:
    """``[(name, file)]`` of the migration files in ``source``, in numeric order.

    ``name`` is the file name without ``.sql`` (e.g. ``0001_state``).  A missing folder
    means no migrations.
    """
    folder = _as_dir(source)
    if not folder.is_dir():
        return []
    found: list[tuple[int, str, Traversable]] = []
    for entry in folder.iterdir():
        m = _FILE.match(entry.name)
        if m and entry.is_file():
            found.append((int(m.group(1)), entry.name.removesuffix(".sql"), entry))
    found.sort(key=lambda t: (t[0], t[1]))
    numbers = [n for n, _, _ in found]
    dupes = sorted({n for n in numbers if numbers.count(n) > 1})
    if dupes:
        raise ValueError(f"duplicate migration numbers in {folder}: {dupes}")
    return [(name, entry) for _, name, entry in found]


def apply_migrations(url: str, migrations: Iterable[tuple[str, Traversable]]) -> list[str]:
    """Apply the not-yet-applied ``migrations`` to the database at ``url``; return their names."""
    applied: list[str] = []
    with psycopg.connect(url, autocommit=False) as conn:
        # Migrations may take longer than the session defaults the server imposes on apps.
        conn.execute("SET statement_timeout = 0")
        conn.execute("SET lock_timeout = '60s'")
        conn.commit()
        for name, entry in migrations:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", [_LOCK_KEY])
                conn.execute(_CREATE_TABLE)
                done = conn.execute(
                    "SELECT 1 FROM trace_schema_migrations WHERE name = %s", [name]
                ).fetchone()
                if done:
                    continue
                text = entry.read_text("utf-8")
                if text.strip():
                    conn.execute(text.encode("utf-8"))
                conn.execute("INSERT INTO trace_schema_migrations (name) VALUES (%s)", [name])
            applied.append(name)
        # Record the table even when there is nothing to apply, so callers can query it.
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", [_LOCK_KEY])
            conn.execute(_CREATE_TABLE)
    return applied


def migrate(
    state_url: str,
    data_url: str | None = None,
    *,
    state_migrations: Source | None = None,
    data_migrations: Source | None = None,
) -> list[str]:
    """Apply state migrations to ``state_url`` and, if given, data migrations to ``data_url``.

    ``state_migrations`` / ``data_migrations`` override the packaged folders (tests use temp
    dirs).  Returns the names applied, state first.  Safe to run twice and concurrently.
    """
    pkg = resources.files("trace_lite").joinpath("sql")
    state_src = state_migrations if state_migrations is not None else pkg / "migrations"
    applied = apply_migrations(state_url, discover(state_src))
    if data_url is not None:
        data_src = data_migrations if data_migrations is not None else pkg / "data_migrations"
        applied += apply_migrations(data_url, discover(data_src))
    return applied
