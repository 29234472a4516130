"""Slot secrets in e2e tests: store them where ``trace worker`` resolves them, and check that
their values are in no process log and no row of the state database."""

from __future__ import annotations

import asyncio

from e2e_harness import TraceProcs

from trace_core.secret_names import org_secret
from trace_lite.secrets import FileSecretStore


def put_secrets(t: TraceProcs, org: str, secrets: dict[str, str]) -> None:
    """Store ``secrets`` (name -> value) in ``org``'s namespace of the Lite SecretStore the
    workers read (``<TRACE_HOME>/.trace/secrets/store``)."""
    org_id = t.scalar("SELECT org_id::text FROM orgs WHERE name = %s", [org])
    store = FileSecretStore(t.trace_dir / "secrets" / "store")

    async def put() -> None:
        for name, value in secrets.items():
            await store.put(org_secret(org_id, name), value.encode())

    asyncio.run(put())


def assert_no_secret_anywhere(t: TraceProcs, values: list[str]) -> None:
    """No secret value in any process log nor in any row of the state database (tasks,
    attempts, events, errors, outbox, leases, DAG versions: every table, dumped as text)."""
    for log in sorted(t.log_dir.iterdir()):
        text = log.read_text(errors="replace")
        for value in values:
            assert value not in text, f"a secret value is in {log.name}"
    tables = [
        name
        for (name,) in t.sql(
            "SELECT quote_ident(table_name) FROM information_schema.tables "
            "WHERE table_schema = current_schema() AND table_type = 'BASE TABLE'"
        )
    ]
    assert "tasks" in tables and "task_attempts" in tables and "task_events" in tables
    for table in tables:
        dump = t.scalar(f"SELECT coalesce(string_agg(r::text, ''), '') FROM {table} r")
        for value in values:
            assert value not in dump, f"a secret value is in table {table}"
