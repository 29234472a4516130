"""The sink of a buffered Postgres dataset: its buffer queue into its table, each row once.

Theory of operation. One ``Sink`` consumes one dataset's buffer queue
(``trace_lite.buffer_forwarder.queue_name``); several may run for one dataset, in one process or
many. For each message (a ``BufferMessage``: one batch pointer of one attempt):

1. find the batch's **target**, by its producer task: the version of the dataset in the
   active pointer set of the dataset's DAG, or, for a task of a building staging of that DAG
   (a rebuild, ``trace_lite.dag_remat``), in the staged pointer set, with the schema the staged
   spec declares; read the batch object, check its size and sha256 against the pointer, and
   parse it strictly against the target's schema (``trace_core.sink.parse_batch``). A pointer,
   object or batch that cannot be used goes to the queue's dead-letter queue **at once**, with
   the reason (row, field, what was wrong); other batches keep flowing;
2. in one data-database transaction per target version: create the version's table if needed
   (``data.dsv_<hex>``, ``trace_lite.datasets.table_name``, unique on ``_dedupe_key``) or
   evolve it to the schema (``trace_lite.sink_tables.ensure_table``); per batch, under a
   savepoint, COPY the rows with their dedupe keys into a temporary table and ``INSERT … ON
   CONFLICT (_dedupe_key) DO NOTHING`` (a batch the table refuses is rolled back alone and
   dead-lettered); **commit**. For a ``replace`` dataset each batch first claims its scope
   (below);
3. **then** emit the dataset's upstream event in the state database: an event of the producing
   task (``rows_committed``, key ``sink/<dataset_uuid>/<batch_key>``), which the ``task_events``
   trigger announces to the DAG fan-out through the outbox. The key makes it idempotent: a
   redelivered batch inserts no row and emits nothing;
4. **then** delete the message.

The batches of one receive (up to 10) commit together per target version (one commit instead
of ten); their events are then emitted in one state transaction and the messages deleted
together, so every batch still goes data commit → event → delete.

A crash anywhere before 4 redelivers the message after its visibility timeout; replaying steps
2-3 stores no row twice (the unique dedupe key) and emits no second event (the event key), so
each dedupe key is stored once and each committed batch has one event. A batch the registry
cannot place yet (no active version) stays on the queue and is retried.

Replace datasets: a batch's scope (its block range, partition key or cursor; no scope is one
scope too) is a partition whose rows are those of its **newest producer**: the producer task
created last (on a tie, the greater task id). The version's ``_scopes`` table records each
scope's owner; a batch claims its scope (an upsert that keeps the row locked until commit, so
sinks of one scope serialize): when its producer is (or becomes) the owner, the scope's rows of
other producers are deleted and its rows inserted; when a newer producer owns it, nothing is
inserted (a slow or redelivered older batch cannot bring back replaced rows). The batch is
committed either way (event, delete). A producer that reads its inputs when it runs (the
Monad example's ``block_stats``) is created by the commit of the data it reads, so the newest
producer of a scope reads the data committed last, and the scope ends holding rows built from
it.

Faults can be injected between the steps (``Sink.fault``): tests stop the loop at
``before_commit``, ``after_commit`` and ``after_event``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

import attrs
import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from trace_core import errors
from trace_core.ports import ObjectStore, Queue, ReceivedMessage
from trace_core.sink import DatasetSchema, ParsedBatch, dedupe_keys, inline_lines, parse_batch
from trace_lite import sqlfile
from trace_lite.buffer_forwarder import BUFFERED, BufferMessage, queue_name
from trace_lite.pg import fetch_as, transaction
from trace_lite.sink_tables import (
    PG_TYPES,
    column_defs,
    ensure_scopes,
    ensure_table,
    scopes_ident,
    table_ident,
)

log = logging.getLogger("trace.sink")

Q = sqlfile.load("sink.sql")

#: The event type of a committed batch (the dataset's upstream event).
EVENT_TYPE = "rows_committed"
#: The points ``Sink.fault`` is called at, in order.
FAULT_POINTS = ("before_commit", "after_commit", "after_event")

#: The types COPY dumps each column's values as (``Copy.set_types``).
_COPY_TYPES: Mapping[str, str] = {**PG_TYPES, "uint64": "numeric", "uint256": "numeric"}


@attrs.frozen
class DatasetRow:
    """A buffered dataset as the registry holds it (``buffered_dataset``)."""

    dataset_uuid: str
    org_id: str
    org: str
    name: str
    storage_kind: str
    schema: str
    unique_key: list[str]
    output_index: int
    dataset_version: str | None
    #: ``append`` or ``replace`` (a scope's rows are its newest producer's: module docstring).
    update_strategy: str = "append"


@attrs.frozen
class BatchResult:
    """What one message came to."""

    #: ``stored`` (committed, event emitted, deleted) or ``dead`` (dead-lettered).
    outcome: str
    rows: int = 0
    #: Rows new to the table (the others' dedupe keys were stored already).
    inserted: int = 0
    #: Whether this delivery emitted the upstream event (a redelivery does not).
    emitted: bool = False
    reason: str | None = None
    batch_key: str | None = None


@attrs.frozen
class QueueStatus:
    """A buffer queue's backlog, by the database's clock."""

    queue: str
    depth: int
    in_flight: int
    dead: int
    #: Age in seconds of the oldest live message: how far the sink lags (0 when empty).
    oldest_age_s: float


@attrs.frozen
class _StatusRow:
    depth: int
    in_flight: int
    dead: int
    oldest_age_s: float


@attrs.frozen
class _EventRow:
    event_key: str


@attrs.frozen
class _TargetRow:
    task_id: str
    task_created: datetime
    may_write: bool
    dataset_version: str | None
    staged_schema: dict[str, str] | None
    staged_unique_key: list[str] | None
    staged_update_strategy: str | None


@attrs.frozen
class _Target:
    """Where a producer's batches go: a dataset version, the schema they are parsed against,
    and whether a scope's rows are replaced by a newer producer's."""

    dataset_version: str | None
    schema: DatasetSchema
    replace: bool = False


@attrs.frozen
class _Batch:
    """A parsed batch on its way into a table."""

    parsed: ParsedBatch
    keys: list[str]
    message: BufferMessage
    #: The batch's scope as stored with its rows (canonical JSON; ``null`` for none).
    scope: str
    #: When its producer task was created (the order of a replace dataset's producers).
    task_created: datetime | None


class SinkCrash(Exception):
    """Raised by an injected fault: the loop stops as a killed process would."""


async def load_dataset(pool: AsyncConnectionPool, org: str, name: str) -> DatasetRow:
    """The buffered dataset ``name`` of ``org``. Raises ``NotFound``, ``Conflict`` (not a
    buffered dataset), ``Unavailable``."""
    async with transaction(pool) as cur:
        rows = await fetch_as(cur, DatasetRow, Q["buffered_dataset"], {"org": org, "name": name})
    if not rows:
        raise errors.NotFound(f"no dataset {name!r} in org {org!r}", field="dataset")
    if rows[0].storage_kind != BUFFERED:
        raise errors.Conflict(f"dataset {name!r} is not buffered", field="dataset")
    return rows[0]


async def queue_status(pool: AsyncConnectionPool, queue: str) -> QueueStatus:
    """Depth, in-flight, dead and the oldest live message's age of ``queue`` (a Postgres
    queue in the state database). Raises ``Unavailable``."""
    async with transaction(pool) as cur:
        (row,) = await fetch_as(cur, _StatusRow, Q["queue_status"], {"queue": queue})
    return QueueStatus(queue, row.depth, row.in_flight, row.dead, row.oldest_age_s)


class Sink:
    """Consumes one buffered dataset's queue into its table (module docstring)."""

    def __init__(
        self,
        *,
        state_pool: AsyncConnectionPool,
        data_pool: AsyncConnectionPool,
        object_store: ObjectStore,
        queue: Queue,
        org: str,
        dataset: str,
        visibility_timeout_s: float = 60.0,
        fault: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        self.state_pool = state_pool
        self.data_pool = data_pool
        self.object_store = object_store
        self.queue = queue
        self.org = org
        self.dataset = dataset
        self.visibility_timeout_s = visibility_timeout_s
        #: Called at each of ``FAULT_POINTS``; raising there stops the loop (tests).
        self.fault = fault
        #: The schema each table was last created or evolved to by this sink.
        self._tables: dict[str, tuple[DatasetSchema, bool]] = {}
        #: Counters since start (the process's metrics).
        self.stats = {
            "batches": 0,
            "rows": 0,
            "inserted": 0,
            "replaced": 0,
            "dead": 0,
            "events": 0,
        }
        self.last_batch_at: float | None = None

    async def process_once(self, *, max_messages: int = 10, wait_s: float = 0.0) -> int:
        """Receive up to ``max_messages`` and handle them (``handle_many``); returns how many
        were received. Raises ``Unavailable`` (the messages not handled are redelivered
        later), and whatever an injected fault raises."""
        messages = await self.queue.receive(
            max_messages=max_messages,
            visibility_timeout=self.visibility_timeout_s,
            wait_seconds=wait_s,
        )
        if messages:
            await self.handle_many(messages)
        return len(messages)

    async def handle(self, message: ReceivedMessage) -> BatchResult:
        """Store one batch (module docstring, steps 1-4). Raises ``Unavailable``."""
        (result,) = await self.handle_many([message])
        return result

    async def handle_many(self, messages: Sequence[ReceivedMessage]) -> list[BatchResult]:
        """Store the batches of ``messages`` (module docstring, steps 1-4). Each batch goes to
        its producer's target (``_targets``: the active version, or the staged one for a task
        of a building staging) and is parsed against that target's schema; the good ones are
        written in one data transaction per target version, each batch under its own
        savepoint (a batch the table refuses is rolled back alone and dead-lettered), and
        committed together; then the events of the committed ones are emitted in one state
        transaction; then they are deleted together. Raises ``Unavailable``."""
        dataset = await load_dataset(self.state_pool, self.org, self.dataset)
        registry = DatasetSchema.of(json.loads(dataset.schema), dataset.unique_key)
        replace = dataset.update_strategy == "replace"
        results: list[BatchResult | None] = [None] * len(messages)
        decoded: list[tuple[int, BufferMessage]] = []
        for i, message in enumerate(messages):
            try:
                decoded.append((i, self._decode(message, dataset)))
            except errors.ValidationFailed as exc:
                results[i] = await self._dead_letter(message, exc)
        targets, created = await self._targets(
            dataset, registry, replace, {m.task_id for _, m in decoded}
        )
        groups: dict[_Target, list[tuple[int, _Batch]]] = {}
        for i, batch_msg in decoded:
            fallback = _Target(dataset.dataset_version, registry, replace)
            target = targets.get(batch_msg.task_id, fallback)
            if target is None:
                refused = errors.Forbidden(
                    f"task {batch_msg.task_id} is not of the DAG producing {dataset.name!r} "
                    "nor of a registered writer of it",
                    field="task_id",
                )
                results[i] = await self._dead_letter(messages[i], refused)
                continue
            try:
                parsed = await self._parse(batch_msg, target.schema)
            except (errors.ValidationFailed, errors.NotFound, errors.Conflict) as exc:
                results[i] = await self._dead_letter(messages[i], exc)
                continue
            if target.dataset_version is None:
                raise errors.Unavailable(f"dataset {dataset.name!r} has no active version yet")
            scope = batch_msg.dedupe_scope()
            keys = dedupe_keys(
                parsed,
                target.schema,
                producer_task_id=batch_msg.task_id,
                dataset_uuid=dataset.dataset_uuid,
                scope=scope,
            )
            scope_json = json.dumps(scope.as_json() if scope else None, separators=(",", ":"))
            batch = _Batch(parsed, keys, batch_msg, scope_json, created.get(batch_msg.task_id))
            groups.setdefault(target, []).append((i, batch))
        stored: list[tuple[ReceivedMessage, BufferMessage, str]] = []
        for target, ready in groups.items():
            assert target.dataset_version is not None
            written = await self._write(target, [b for _, b in ready])
            for (i, b), outcome in zip(ready, written, strict=True):
                batch_msg, parsed = b.message, b.parsed
                if isinstance(outcome, errors.ValidationFailed):
                    results[i] = await self._dead_letter(messages[i], outcome)
                    continue
                stored.append((messages[i], batch_msg, target.dataset_version))
                results[i] = BatchResult(
                    "stored", len(parsed.rows), outcome, batch_key=batch_msg.batch_key
                )
                self.stats["rows"] += len(parsed.rows)
                self.stats["inserted"] += outcome
        done = [r for r in results if r is not None]
        if not stored:
            return done
        await self._fault("after_commit")
        emitted = await self._emit(dataset, [(m, v) for _, m, v in stored])
        await self._fault("after_event")
        await self.queue.delete([message.receipt for message, _, _ in stored])
        self.stats["batches"] += len(stored)
        self.stats["events"] += len(emitted)
        self.last_batch_at = time.time()
        return [
            attrs.evolve(r, emitted=event_key(dataset.dataset_uuid, r.batch_key) in emitted)
            if r.outcome == "stored" and r.batch_key is not None
            else r
            for r in done
        ]

    async def _targets(
        self, dataset: DatasetRow, registry: DatasetSchema, replace: bool, task_ids: set[str]
    ) -> tuple[dict[str, _Target | None], dict[str, datetime]]:
        """Per producer task: the version its batches go to, the schema they are parsed
        against and the update strategy (``batch_targets``: a staged producer's staged version
        and spec), None for a task of another DAG (it may not write the dataset); and when
        each was created."""
        if not task_ids:
            return {}, {}
        async with transaction(self.state_pool) as cur:
            rows = await fetch_as(
                cur,
                _TargetRow,
                Q["batch_targets"],
                {"dataset_uuid": dataset.dataset_uuid, "task_ids": sorted(task_ids)},
            )
        out: dict[str, _Target | None] = {}
        for r in rows:
            if not r.may_write:
                out[r.task_id] = None
                continue
            schema, mode = registry, replace
            if r.staged_schema is not None:
                schema = DatasetSchema.of(r.staged_schema, r.staged_unique_key or ())
            if r.staged_update_strategy is not None:
                mode = r.staged_update_strategy == "replace"
            out[r.task_id] = _Target(r.dataset_version, schema, mode)
        return out, {r.task_id: r.task_created for r in rows}

    def _decode(self, message: ReceivedMessage, dataset: DatasetRow) -> BufferMessage:
        batch_msg = BufferMessage.decode(message.body)
        if batch_msg.dataset_uuid != dataset.dataset_uuid:
            raise errors.ValidationFailed(
                f"the message is for dataset {batch_msg.dataset_uuid}, this sink serves "
                f"{dataset.dataset_uuid}",
                field="dataset_uuid",
            )
        return batch_msg

    async def _parse(self, batch_msg: BufferMessage, schema: DatasetSchema) -> ParsedBatch:
        parsed = parse_batch(await self._read(batch_msg), schema)
        if len(parsed.rows) != batch_msg.row_count:
            raise errors.ValidationFailed(
                f"the batch holds {len(parsed.rows)} rows, its pointer says {batch_msg.row_count}",
                field="row_count",
            )
        return parsed

    async def _read(self, m: BufferMessage) -> bytes:
        if m.rows is not None:
            data = inline_lines(m.rows)
        elif m.object_key is not None:
            data = await self.object_store.get(m.object_key)
        else:
            raise errors.ValidationFailed("the message names no rows", field="object_key")
        if len(data) != m.byte_size or hashlib.sha256(data).hexdigest() != m.sha256:
            raise errors.ValidationFailed(
                "the batch object does not match its pointer's byte_size/sha256", field="sha256"
            )
        return data

    async def _dead_letter(self, message: ReceivedMessage, exc: errors.TraceError) -> BatchResult:
        reason = f"{exc.code}: {exc.message}"
        if exc.field and exc.field not in exc.message:
            reason = f"{exc.code} ({exc.field}): {exc.message}"
        await self.queue.dead_letter([(message, reason)])
        self.stats["dead"] += 1
        log.warning("buffer batch dead-lettered", extra={"queue": self.queue.name, "why": reason})
        return BatchResult("dead", reason=reason)

    async def _write(
        self, target: _Target, batches: Sequence[_Batch]
    ) -> list[int | errors.ValidationFailed]:
        """In one data transaction: evolve the table if needed, then per batch (under a
        savepoint) COPY into a temporary table and insert the rows new to the table -- for a
        replace target, first claim the batch's scope (``_claim``): a batch whose scope a
        newer producer owns inserts nothing, else the scope's rows of older producers are
        deleted; commit. Returns per batch the rows inserted, or why the table refused it
        (that batch alone is rolled back; a table that cannot take the schema refuses every
        batch)."""
        if not batches:
            return []
        version, schema = target.dataset_version, target.schema
        assert version is not None
        table = table_ident(version)
        staging = sql.Identifier("sink_batch")
        names = sql.SQL(", ").join(sql.Identifier(c) for c in schema.names)
        columns = column_defs(schema)
        copy_types = [_COPY_TYPES[t] for _, t in schema.columns] + ["bytea"]
        create_staging = sql.SQL(Q["create_staging"]).format(staging=staging, columns=columns)
        truncate = sql.SQL(Q["truncate_staging"]).format(staging=staging)
        copy_sql = sql.SQL(Q["copy_staging"]).format(staging=staging, names=names)
        insert = sql.SQL(Q["insert_new_rows"]).format(table=table, names=names, staging=staging)
        outcomes: list[int | errors.ValidationFailed | None] = [None] * len(batches)
        # scopes in one order in every sink, so two sinks' claims cannot deadlock
        order = sorted(range(len(batches)), key=lambda j: batches[j].scope)
        try:
            async with self.data_pool.connection() as conn, conn.transaction():
                async with conn.cursor() as cur:
                    if self._tables.get(version) != (schema, target.replace):
                        await ensure_table(cur, version, schema)  # raising rolls back
                        if target.replace:
                            await ensure_scopes(cur, version)
                    for j in order:
                        b = batches[j]
                        parsed, keys, m = b.parsed, b.keys, b.message
                        try:
                            async with conn.transaction():  # a savepoint per batch
                                if target.replace and not await self._claim(cur, version, b):
                                    outcomes[j] = 0  # a newer producer owns the scope
                                    continue
                                await cur.execute(create_staging)
                                await cur.execute(truncate)
                                async with cur.copy(copy_sql) as copy:
                                    copy.set_types(copy_types)
                                    for row, k in zip(parsed.rows, keys, strict=True):
                                        await copy.write_row((*row, bytes.fromhex(k)))
                                params = {
                                    "task_id": m.task_id,
                                    "batch_key": m.batch_key,
                                    "scope": b.scope,
                                }
                                await cur.execute(insert, params)
                                outcomes[j] = cur.rowcount
                        except (
                            psycopg.DataError,
                            psycopg.IntegrityError,
                            psycopg.ProgrammingError,
                        ) as exc:
                            # the table refuses what the schema admitted (changed outside
                            # Trace): retrying cannot help
                            outcomes[j] = errors.ValidationFailed(
                                f"the table refused the batch: {exc.diag.message_primary}",
                                field="rows",
                            )
                    await self._fault("before_commit")
        except errors.ValidationFailed as exc:  # the table cannot take the schema
            return [exc] * len(batches)
        except psycopg.Error as exc:
            raise errors.Unavailable(f"data database: {type(exc).__name__}") from exc
        self._tables[version] = (schema, target.replace)
        return [o if o is not None else 0 for o in outcomes]

    async def _claim(self, cur: psycopg.AsyncCursor[Any], version: str, batch: _Batch) -> bool:
        """Make the batch's producer its scope's owner unless a newer producer (created
        later; on a tie, the greater task id) owns it, holding the scope's row lock until
        commit; when it is the owner, delete the scope's rows of other producers. Returns
        whether the batch's rows belong in the table."""
        if batch.task_created is None:  # its task is gone: nothing can order it
            raise errors.Unavailable(f"producer {batch.message.task_id} not found")
        scopes = scopes_ident(version)
        params = {
            "scope": batch.scope,
            "task_id": batch.message.task_id,
            "task_created": batch.task_created,
        }
        await cur.execute(sql.SQL(Q["claim_scope"]).format(scopes=scopes), params)
        await cur.execute(sql.SQL(Q["scope_owner"]).format(scopes=scopes), params)
        owner = await cur.fetchone()
        if owner is None or uuid.UUID(str(owner[0])) != uuid.UUID(batch.message.task_id):
            return False
        delete = sql.SQL(Q["delete_replaced_rows"]).format(table=table_ident(version))
        await cur.execute(delete, params)
        self.stats["replaced"] += cur.rowcount
        return True

    async def _emit(
        self, dataset: DatasetRow, batches: Sequence[tuple[BufferMessage, str]]
    ) -> set[str]:
        """The upstream events of committed batches (each with the version it went to), in one
        transaction; returns the keys of those emitted now (a batch whose event exists already
        is skipped)."""
        async with transaction(self.state_pool) as cur:
            rows = await fetch_as(
                cur,
                _EventRow,
                Q["insert_sink_events"],
                {
                    "task_ids": [m.task_id for m, _ in batches],
                    "keys": [event_key(dataset.dataset_uuid, m.batch_key) for m, _ in batches],
                    "attempts": [m.attempt for m, _ in batches],
                    "type": EVENT_TYPE,
                    "payloads": [
                        Jsonb(
                            {
                                "dataset": dataset.name,
                                "dataset_uuid": dataset.dataset_uuid,
                                "dataset_version": version,
                                "batch_key": m.batch_key,
                                "row_count": m.row_count,
                                "output": dataset.output_index,
                            }
                        )
                        for m, version in batches
                    ],
                },
            )
        return {r.event_key for r in rows}

    async def _fault(self, point: str) -> None:
        if self.fault is not None:
            await self.fault(point)


def event_key(dataset_uuid: str, batch_key: str) -> str:
    """The key of a batch's upstream event among its producer task's events."""
    return f"sink/{dataset_uuid}/{batch_key}"


def sink_queue(queue_for: Callable[[str], Queue], dataset: DatasetRow) -> Queue:
    """The buffer queue of ``dataset``."""
    return queue_for(queue_name(dataset.dataset_uuid))


__all__ = [
    "EVENT_TYPE",
    "FAULT_POINTS",
    "PG_TYPES",
    "BatchResult",
    "DatasetRow",
    "QueueStatus",
    "Sink",
    "SinkCrash",
    "event_key",
    "load_dataset",
    "queue_status",
    "sink_queue",
]
