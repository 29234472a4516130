"""Run a handler locally, without a platform: ``trace_udf.testing.run(handler, payload)``.

The handler gets a real ``Context``: ``query`` runs over in-memory tables built from
``datasets`` (SQLite from the standard library: plain ``SELECT``\\s behave as on the Query
Service, DuckDB-only functions do not), ``emit_rows`` and ``emit_event`` collect as usual, and
the answer comes back as a ``LocalResult`` -- checked the way the runner checks a response.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from trace_udf._context import Context, Invocation, chunk_rows
from trace_udf.runtime import invoke


@dataclass
class LocalResult:
    """What a local run produced."""

    result: dict[str, Any] | None
    #: Rows by dataset, in emit order (what buffer-publish would carry).
    rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    #: Batch keys by dataset, as the runtime would publish them.
    batch_keys: dict[str, list[str]] = field(default_factory=dict)
    final_events: list[dict[str, Any]] = field(default_factory=list)


def _sqlite_query(
    datasets: Mapping[str, Sequence[Mapping[str, Any]]],
) -> Callable[[str, int | None], list[dict[str, Any]]]:
    conn = sqlite3.connect(":memory:")
    for name, rows in datasets.items():
        columns = sorted({k for r in rows for k in r})
        if not columns:
            conn.execute(f'CREATE TABLE "{name}" (_empty INTEGER)')
            continue
        cols = ", ".join(f'"{c}"' for c in columns)
        conn.execute(f'CREATE TABLE "{name}" ({cols})')
        marks = ", ".join("?" for _ in columns)
        conn.executemany(
            f'INSERT INTO "{name}" ({cols}) VALUES ({marks})',
            [[r.get(c) for c in columns] for r in rows],
        )

    def query(sql: str, max_rows: int | None) -> list[dict[str, Any]]:
        cur = conn.execute(sql)
        names = [d[0] for d in cur.description or ()]
        rows = cur.fetchall() if max_rows is None else cur.fetchmany(max_rows)
        return [dict(zip(names, r, strict=True)) for r in rows]

    return query


def run(
    handler: Callable[[Context], Any],
    payload: Mapping[str, Any] | None = None,
    *,
    datasets: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    attempt: int = 1,
    timeout_s: int = 60,
) -> LocalResult:
    """Run ``handler`` once against ``payload`` with ``datasets`` (name -> rows) readable
    through ``ctx.query``. Returns a ``LocalResult``; the handler's exception propagates."""
    readable = dict(datasets or {})
    event = {
        "task_id": "00000000-0000-4000-8000-000000000000",
        "org_id": "00000000-0000-4000-8000-000000000001",
        "operator": "udf",
        "attempt": attempt,
        "max_attempts": 3,
        "timeout_s": timeout_s,
        "staging_prefix": "",
        "payload": dict(payload or {}),
        "capability_token": "local",
        "lease_token": "00000000-0000-4000-8000-000000000002",
        "lease_expires_at": "",
        "bundle_url": "",
    }
    invocation = Invocation.from_event(
        event, deadline_ms=int(time.time() * 1000) + timeout_s * 1000, request_id="local"
    )
    ctx = _LocalContext(invocation, None, query_fn=_sqlite_query(readable))
    ctx.granted = sorted(readable)
    result = invoke(handler, ctx)
    keys: dict[str, list[str]] = {}
    for batch in ctx._batches:
        for i, _ in enumerate(chunk_rows(batch.rows)):
            keys.setdefault(batch.dataset, []).append(f"{batch.key}.{i}")
    return LocalResult(result, ctx.pending_rows, keys, list(ctx.final_events))


class _LocalContext(Context):
    granted: list[str] = []

    @property
    def datasets(self) -> list[str]:
        return list(self.granted)


__all__ = ["LocalResult", "run"]
