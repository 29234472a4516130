"""One statement on a database URL, for tests' checks of what is stored."""

from __future__ import annotations

from typing import Any

import psycopg


def sql(url: str, query: str, params: Any = None) -> list[tuple[Any, ...]]:
    """Run ``query`` in its own autocommit connection; its rows ([] for a statement without)."""
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else []
