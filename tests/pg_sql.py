"""One statement on a database URL, for tests' checks of what is stored."""

from __future__ import annotations

from typing import Any

import psycopg


def sql(
    url: str, query: str, params: Any = None, *, connect_timeout: int | None = None
) -> list[tuple[Any, ...]]:
    """Run ``query`` in its own autocommit connection; its rows ([] for a statement without).
    ``connect_timeout``: seconds to wait for the connection (``None``: libpq's default)."""
    with psycopg.connect(url, autocommit=True, connect_timeout=connect_timeout) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else []
