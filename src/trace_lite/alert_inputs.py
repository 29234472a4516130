"""The rows an alert operator's input event announces, read by the platform (Lite: Postgres).

Implements ``trace_sdk.alerts.AlertInputs`` for ``rows_committed`` events (the sink's upstream
event of a committed buffer batch, ``trace_lite.sink``): the rows that batch stored in the
dataset version's table, ``data.dsv_<version>`` in the data database, found by the producer
task and the batch key the table keeps with every row (``_task_id``, ``_batch_key``).

Checked first, in the state database: the attempt is the task's running one (else
``LeaseLost``), and the event's dataset is a buffered dataset of the task's own org with that
open version (else ``NotFound``): an event never reads across orgs. Values come back as the
rules read them: ``numeric`` integers as ``int``, bytes and times as they are.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from decimal import Decimal
from typing import Any, NamedTuple

from psycopg import sql
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from trace_core import errors
from trace_lite import sqlfile
from trace_lite.datasets import DATA_SCHEMA
from trace_lite.pg import fetch_named, transaction
from trace_lite.sink import EVENT_TYPE, load_dataset

Q = sqlfile.load("alert_inputs.sql")


class _Scope(NamedTuple):
    org_id: str
    running: bool
    dataset: str | None
    dataset_version: str | None


def _uuid(value: object, field: str) -> str:
    try:
        return str(uuid.UUID(str(value)))
    except ValueError:
        raise errors.ValidationFailed("not a UUID", field=field) from None


def _plain(value: Any) -> Any:
    if isinstance(value, Decimal) and value == value.to_integral_value():
        return int(value)
    if isinstance(value, Decimal):
        return str(value)
    return value


class PgAlertInputs:
    """``rows(task_id, attempt, event)`` over the state and data databases."""

    def __init__(self, state_pool: AsyncConnectionPool, data_pool: AsyncConnectionPool) -> None:
        self.state_pool = state_pool
        self.data_pool = data_pool

    async def rows(
        self, task_id: str, attempt: int, event: Mapping[str, Any]
    ) -> list[dict[str, Any]]:
        """The rows of the batch ``event`` announces. Raises ``ValidationFailed`` (not a
        ``rows_committed`` event), ``NotFound``, ``LeaseLost``, ``Unavailable``."""
        if event.get("type") != EVENT_TYPE:
            raise errors.ValidationFailed(
                f"an alert operator reads {EVENT_TYPE} events, not {event.get('type')!r}",
                field="event.type",
            )
        inner = event.get("payload")
        if not isinstance(inner, Mapping):
            raise errors.ValidationFailed("the event has no payload", field="event.payload")
        params = {
            "task_id": task_id,
            "attempt": attempt,
            "dataset_uuid": _uuid(inner.get("dataset_uuid"), "event.payload.dataset_uuid"),
            "dataset_version": _uuid(inner.get("dataset_version"), "event.payload.dataset_version"),
        }
        producer = _uuid(event.get("producer_task_id"), "event.producer_task_id")
        batch_key = inner.get("batch_key")
        if not isinstance(batch_key, str):
            raise errors.ValidationFailed("no batch key", field="event.payload.batch_key")
        async with transaction(self.state_pool) as cur:
            scopes = await fetch_named(cur, _Scope, Q["input_scope"], params)
        if not scopes:
            raise errors.NotFound("no such task")
        scope = scopes[0]
        if not scope.running:
            raise errors.LeaseLost("the attempt is not the task's running one")
        if scope.dataset_version is None:
            raise errors.NotFound("the event names no buffered dataset version of the task's org")
        table = sql.Identifier(DATA_SCHEMA, f"dsv_{uuid.UUID(scope.dataset_version).hex}")
        query = sql.SQL(Q["batch_rows"]).format(table=table)
        async with transaction(self.data_pool) as cur:
            async with cur.connection.cursor(row_factory=dict_row) as rows_cur:
                await rows_cur.execute(query, {"task_id": producer, "batch_key": batch_key})
                found = await rows_cur.fetchall()
        return [{k: _plain(v) for k, v in r.items() if not k.startswith("_")} for r in found]


class _Found(NamedTuple):
    found: bool


class _DeliveryStates(NamedTuple):
    alert_key: str
    state: str
    n: int


async def recent_alert_events(
    state_pool: AsyncConnectionPool,
    data_pool: AsyncConnectionPool,
    org: str,
    *,
    dataset: str = "alert_events",
    limit: int = 50,
) -> list[dict[str, Any]]:
    """The newest ``limit`` events of ``org``'s alert events dataset (its active version),
    each with its deliveries counted per state (``trace alerts ls``). Raises ``NotFound``,
    ``Conflict`` (not a buffered dataset)."""
    ds = await load_dataset(state_pool, org, dataset)
    if ds.dataset_version is None:
        return []
    table = sql.Identifier(DATA_SCHEMA, f"dsv_{uuid.UUID(ds.dataset_version).hex}")
    async with transaction(data_pool) as cur:
        name = f"{DATA_SCHEMA}.dsv_{uuid.UUID(ds.dataset_version).hex}"
        (exists,) = await fetch_named(cur, _Found, Q["table_exists"], {"name": name})
        if not exists.found:
            return []  # no batch stored yet
        async with cur.connection.cursor(row_factory=dict_row) as rows_cur:
            query = sql.SQL(Q["recent_events"]).format(table=table)
            await rows_cur.execute(query, {"limit": limit})
            events = await rows_cur.fetchall()
    keys = [str(e["alert_key"]) for e in events]
    async with transaction(state_pool) as cur:
        states = await fetch_named(
            cur, _DeliveryStates, Q["delivery_states"], {"org_id": ds.org_id, "keys": keys}
        )
    by_key: dict[str, dict[str, int]] = {}
    for s in states:
        by_key.setdefault(s.alert_key, {})[s.state] = s.n
    return [
        {
            **e,
            "event_time": e["event_time"].isoformat(),
            "deliveries": by_key.get(e["alert_key"], {}),
        }
        for e in events
    ]


__all__ = ["PgAlertInputs", "recent_alert_events"]
