-- Buffered Postgres datasets: the buffer forwarder (trace_lite.buffer_forwarder) and the sink
-- (trace_lite.sink). State-database statements first, then data-database ones, which are
-- psycopg.sql templates: {table}, {columns}, ... are filled with sql.Identifier / fixed SQL.

-- name: buffered_dataset
-- A dataset of an org by name, with its schema and the version its DAG's active pointer set
-- names (NULL before the first deploy gave it one).
SELECT d.dataset_uuid::text AS dataset_uuid, d.org_id::text AS org_id, o.name AS org,
       d.name, d.storage_kind, d.schema::text AS schema, d.unique_key, d.output_index,
       p.dataset_version::text AS dataset_version, d.update_strategy
FROM datasets d
JOIN orgs o ON o.org_id = d.org_id
JOIN dags g ON g.dag_id = d.dag_id
LEFT JOIN dag_pointers p ON p.dag_id = g.dag_id AND p.generation = g.active_generation
                        AND p.dataset_uuid = d.dataset_uuid
WHERE o.name = %(org)s AND d.name = %(name)s;

-- name: buffered_datasets
-- Every buffered dataset of an org, by name.
SELECT d.name FROM datasets d JOIN orgs o ON o.org_id = d.org_id
WHERE o.name = %(org)s AND d.storage_kind = 'buffered_postgres'
ORDER BY d.name;

-- name: claim_buffer_outbox
-- Lock due buffer-batch announcements of the given topics with the batch pointer and the
-- dataset it names in the producer's org (NULL when there is no such dataset); rows other
-- forwarders hold are skipped.
SELECT o.id, o.tries, now() AS now, b.task_id::text AS task_id, b.batch_key, b.attempt,
       b.object_key, b.row_count, b.byte_size, b.sha256, b.scope, b.inline_rows, b.dataset,
       d.dataset_uuid::text AS dataset_uuid, d.storage_kind
FROM outbox o
LEFT JOIN buffer_batches b ON b.task_id = (o.payload ->> 'task_id')::uuid
                          AND b.batch_key = o.payload ->> 'batch_key'
LEFT JOIN tasks t ON t.task_id = b.task_id
LEFT JOIN datasets d ON d.org_id = t.org_id AND d.name = b.dataset
WHERE o.state = 'pending' AND o.available_at <= now() AND o.topic = ANY(%(topics)s::text[])
ORDER BY o.available_at, o.id
LIMIT %(n)s
FOR UPDATE OF o SKIP LOCKED;

-- name: insert_sink_events
-- The dataset's upstream events for committed batches, as events of the producing tasks; each
-- key names the dataset and the batch, so a redelivered batch inserts nothing (no row back).
-- The task_events trigger announces them to the DAG fan-out (outbox 'dag.event', migration 0011).
-- payload.output is the producer's own output publishing the dataset (its DAG version's publish
-- entry for its job: several jobs may write a multi_writer dataset, each from its own output),
-- else the registry's output_index (a producer outside a DAG).
INSERT INTO task_events (task_id, event_key, attempt, event_type, payload)
SELECT e.task_id, e.key, e.attempt, %(type)s,
       e.payload || jsonb_build_object('output', coalesce(
           (SELECT (p ->> 'output')::int
            FROM tasks t
            JOIN dag_versions v ON v.dag_id = t.dag_id AND v.version = t.dag_version
            CROSS JOIN LATERAL jsonb_array_elements(v.spec -> 'publish') AS p
            WHERE t.task_id = e.task_id AND p ->> 'job' = t.dag_job
              AND p ->> 'dataset' = e.payload ->> 'dataset'
            ORDER BY (p ->> 'output')::int LIMIT 1),
           (e.payload ->> 'output')::int))
FROM unnest(%(task_ids)s::uuid[], %(keys)s::text[], %(attempts)s::int[], %(payloads)s::jsonb[])
     AS e (task_id, key, attempt, payload)
ON CONFLICT (task_id, event_key) DO NOTHING
RETURNING event_key;

-- name: queue_status
-- A queue's depth (neither deleted nor dead), in-flight and dead counts, and the age in seconds
-- of its oldest live message (the sink's lag), by the database's clock.
SELECT count(*) FILTER (WHERE NOT dead) AS depth,
       count(*) FILTER (WHERE NOT dead AND receipt IS NOT NULL AND visible_at > now()) AS in_flight,
       count(*) FILTER (WHERE dead) AS dead,
       coalesce(extract(epoch FROM now() - min(sent_at) FILTER (WHERE NOT dead)), 0)::float8
           AS oldest_age_s
FROM queue_messages WHERE queue = %(queue)s;

-- name: pending_announcements
-- Buffer-batch announcements of a topic not forwarded to a dataset queue yet.
SELECT count(*) AS pending FROM outbox WHERE topic = %(topic)s AND state = 'pending';

-- name: dead_counts
-- Queues with dead letters, and how many.
SELECT queue, count(*) AS dead FROM queue_messages WHERE dead GROUP BY queue ORDER BY queue;

-- name: purge_dead
-- Delete a queue's dead letters; returns how many.
WITH gone AS (DELETE FROM queue_messages WHERE queue = %(queue)s AND dead RETURNING 1)
SELECT count(*) AS purged FROM gone;

-- name: create_table
-- (data database) The dataset version's table: its columns, who wrote each row (and under
-- which scope: the batch's canonical JSON, 'null' for none), and the dedupe key, unique.
CREATE TABLE IF NOT EXISTS {table} (
    {columns},
    _dedupe_key bytea NOT NULL,
    _task_id uuid NOT NULL,
    _batch_key text NOT NULL,
    _loaded_at timestamptz NOT NULL DEFAULT now(),
    _scope text,
    CONSTRAINT {constraint} UNIQUE (_dedupe_key)
);

-- name: add_scope_column
-- (data database) A table created before rows recorded their scope: old rows hold null.
ALTER TABLE {table} ADD COLUMN IF NOT EXISTS _scope text;

-- name: create_scopes
-- (data database) A replace dataset version's scopes: each scope's newest producer (by the
-- producer task's creation, then its id), whose rows are the scope's rows.
CREATE TABLE IF NOT EXISTS {scopes} (
    scope        text PRIMARY KEY,
    task_id      uuid NOT NULL,
    task_created timestamptz NOT NULL,
    replaced_at  timestamptz NOT NULL DEFAULT now()
);

-- name: index_scopes
-- (data database) The index that finds a replace dataset version's rows of one scope.
CREATE INDEX IF NOT EXISTS {index} ON {table} (_scope);

-- name: claim_scope
-- (data database) The batch's producer becomes the scope's owner unless a newer producer owns
-- it; the scope's row stays locked until commit (ON CONFLICT DO UPDATE locks it even when the
-- WHERE is false), so concurrent sinks of one scope serialize here.
INSERT INTO {scopes} AS s (scope, task_id, task_created)
VALUES (%(scope)s, %(task_id)s, %(task_created)s)
ON CONFLICT (scope) DO UPDATE
SET task_id = excluded.task_id, task_created = excluded.task_created, replaced_at = now()
WHERE (s.task_created, s.task_id) < (excluded.task_created, excluded.task_id);

-- name: scope_owner
-- (data database) The producer whose rows a scope holds.
SELECT task_id::text AS task_id FROM {scopes} WHERE scope = %(scope)s;

-- name: delete_replaced_rows
-- (data database) The rows of a scope written by producers other than its owner; returns how
-- many.
DELETE FROM {table} WHERE _scope = %(scope)s AND _task_id <> %(task_id)s;

-- name: lock_table_ddl
-- (data database) Serialize creating one table among concurrent sinks.
SELECT pg_advisory_xact_lock(hashtext(%(table)s));

-- name: create_staging
-- (data database) The batches' staging table, dropped at commit (one per transaction: each
-- batch truncates it first).
CREATE TEMPORARY TABLE IF NOT EXISTS {staging} ({columns}, _dedupe_key bytea NOT NULL)
    ON COMMIT DROP;

-- name: truncate_staging
-- (data database) Empty the staging table for the next batch of the transaction.
TRUNCATE {staging};

-- name: copy_staging
-- (data database) COPY the batch's rows into the staging table.
COPY {staging} ({names}, _dedupe_key) FROM STDIN;

-- name: insert_new_rows
-- (data database) Rows whose dedupe key the table does not hold yet; returns how many.
INSERT INTO {table} ({names}, _dedupe_key, _task_id, _batch_key, _scope)
SELECT {names}, _dedupe_key, %(task_id)s, %(batch_key)s, %(scope)s FROM {staging}
ON CONFLICT (_dedupe_key) DO NOTHING;

-- name: claim_unprovisioned_queues
-- Lock due buffer queues not created on the backend yet (migration 0019); rows another
-- provisioning pass holds are skipped.
SELECT queue, tries FROM buffer_queues
WHERE provisioned_at IS NULL AND available_at <= now()
ORDER BY available_at, queue
LIMIT %(n)s
FOR UPDATE SKIP LOCKED;

-- name: mark_queue_provisioned
-- The backend queue (and its DLQ) exists.
UPDATE buffer_queues SET provisioned_at = now(), last_error = NULL WHERE queue = %(queue)s;

-- name: queue_provision_failed
-- Creating the backend queue failed: try again after a delay.
UPDATE buffer_queues
SET tries = tries + 1, available_at = now() + make_interval(secs => %(delay_s)s),
    last_error = %(error)s
WHERE queue = %(queue)s;

-- name: buffer_queue
-- A dataset's buffer queue row (NULL provisioned_at: not created on the backend yet).
SELECT queue, provisioned_at IS NOT NULL AS provisioned, last_error
FROM buffer_queues WHERE dataset_uuid = %(dataset_uuid)s::uuid;

-- name: buffer_queue_names
-- Every buffer queue created on the backend (trace dlq ls on a backend that cannot list by
-- itself).
SELECT queue AS name FROM buffer_queues WHERE provisioned_at IS NOT NULL ORDER BY queue;

-- name: registered_buffered
-- The registered schema and unique_key of the org's buffered datasets among the given names
-- (a deploy checks its new schemas against them: trace_lite.sink_tables).
SELECT name, schema, unique_key FROM datasets
WHERE org_id = %(org_id)s AND name = ANY(%(names)s::text[])
  AND storage_kind = 'buffered_postgres';

-- name: table_columns
-- (data database) The columns of a table and their types, as the catalog spells them.
SELECT a.attname::text AS name, format_type(a.atttypid, a.atttypmod) AS type
FROM pg_attribute a
WHERE a.attrelid = to_regclass(%(table)s) AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum;

-- name: add_column
-- (data database) A column the dataset's schema gained: nullable, old rows hold null.
ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column} {type};

-- name: widen_column
-- (data database) A column whose declared type widened (trace_core.sink.WIDENINGS).
ALTER TABLE {table} ALTER COLUMN {column} TYPE {type} USING {column}::{type};

-- name: batch_targets
-- Where the batches of the given producer tasks go: the dataset's version in the pointer set of
-- the producer's DAG version -- the staged set while that version is a building staging of the
-- dataset's DAG (trace_lite.dag_remat), else the active set -- and, for a staged producer, the
-- output schema, unique_key and update_strategy its staged spec declares for the dataset (NULL:
-- the registry's); and when each producer task was created (a replace dataset's scope order).
-- may_write: a task of a DAG writes only the datasets its DAG owns or is a registered writer of
-- (trace_dag_may_write, migration 0033; ADR 0037: a writer DAG's batches land in the owner's
-- active pointer set; a writer DAG's staging stages nothing of the dataset).
SELECT t.task_id::text AS task_id, t.created_at AS task_created,
       trace_dag_may_write(t.dag_id, d.dag_id, d.dataset_uuid) AS may_write,
       coalesce(sp.dataset_version, ap.dataset_version)::text AS dataset_version,
       o.out -> 'schema' AS staged_schema, o.out -> 'unique_key' AS staged_unique_key,
       o.out ->> 'update_strategy' AS staged_update_strategy
FROM tasks t
JOIN datasets d ON d.dataset_uuid = %(dataset_uuid)s::uuid
JOIN dags g ON g.dag_id = d.dag_id
LEFT JOIN dag_rematerializations m ON m.dag_id = d.dag_id AND t.dag_id = d.dag_id
                                   AND m.version = t.dag_version AND m.state = 'building'
LEFT JOIN dag_pointers sp ON sp.dag_id = m.dag_id AND sp.generation = m.generation
                         AND sp.dataset_uuid = d.dataset_uuid
LEFT JOIN dag_pointers ap ON ap.dag_id = g.dag_id AND ap.generation = g.active_generation
                         AND ap.dataset_uuid = d.dataset_uuid
LEFT JOIN LATERAL (
    SELECT v.spec -> 'jobs' -> (pub ->> 'job') -> 'outputs' -> ((pub ->> 'output')::int) AS out
    FROM dag_versions v
    CROSS JOIN LATERAL jsonb_array_elements(v.spec -> 'publish') AS pub
    WHERE v.dag_id = m.dag_id AND v.version = m.version AND pub ->> 'dataset' = d.name
    ORDER BY (pub ->> 'job') = t.dag_job DESC
    LIMIT 1
) o ON true
WHERE t.task_id = ANY(%(task_ids)s::uuid[]);
