-- The dataset registry as DAG deploys write it (trace_lite.dag_registry): each publish entry of a
-- version registered as a dataset its DAG owns (datasets.dag_id), or as a writer of a
-- multi_writer dataset another DAG owns (dataset_writers, migration 0031; ADR 0037). The kernel
-- (trace_core.dag.registry_problem) decides what a DAG may publish; these statements read the
-- facts it needs and apply what was decided.

-- name: registry_facts
-- What validation needs of the datasets of an org (all of them, or those named): the owning
-- DAG, multi-writer, schema, unique_key, and the other DAGs registered as writers.
SELECT d.name, d.dataset_uuid::text AS dataset_uuid, g.name AS producer_dag, d.multi_writer,
       d.schema, d.unique_key,
       ARRAY(SELECT wg.name FROM dataset_writers w JOIN dags wg ON wg.dag_id = w.dag_id
             WHERE w.dataset_uuid = d.dataset_uuid ORDER BY wg.name) AS writer_dags
FROM datasets d JOIN dags g ON g.dag_id = d.dag_id
WHERE d.org_id = %(org_id)s
  AND (%(names)s::text[] IS NULL OR d.name = ANY(%(names)s::text[]));

-- name: lock_registered
-- Lock the registry rows of the names a deploy publishes (in name order), so the facts read next
-- hold until it commits: a concurrent deploy of an owner or another writer of the same dataset
-- waits.
SELECT d.name FROM datasets d
WHERE d.org_id = %(org_id)s AND d.name = ANY(%(names)s::text[])
ORDER BY d.name
FOR NO KEY UPDATE;

-- name: register_owned
-- Register a version's published outputs (one JSON array of rows, names unique) as datasets this
-- DAG owns: new names are inserted; with %(refresh)s (a version going live) the names it owns
-- move to their new job/output, schema and strategy, without (a staging: the live version keeps
-- its metadata until the cutover) they are left as they are. Answers every name of the rows
-- this DAG now owns, so a name another DAG owns (or took meanwhile) answers no row.
WITH c AS (
    SELECT * FROM jsonb_to_recordset(%(rows)s::jsonb)
        AS c(name text, job text, output int, storage_kind text, schema jsonb,
             update_strategy text, unique_key jsonb, multi_writer boolean)
), written AS (
    INSERT INTO datasets (dataset_uuid, org_id, name, dag_id, job_name, output_index,
                          storage_kind, schema, update_strategy, unique_key, multi_writer)
    SELECT gen_random_uuid(), %(org_id)s, c.name, %(dag_id)s, c.job, c.output, c.storage_kind,
           c.schema, c.update_strategy, ARRAY(SELECT jsonb_array_elements_text(c.unique_key)),
           c.multi_writer
    FROM c
    ON CONFLICT (org_id, name) DO UPDATE
    SET job_name = EXCLUDED.job_name, output_index = EXCLUDED.output_index,
        storage_kind = EXCLUDED.storage_kind, schema = EXCLUDED.schema,
        update_strategy = EXCLUDED.update_strategy, unique_key = EXCLUDED.unique_key,
        multi_writer = EXCLUDED.multi_writer
    WHERE datasets.dag_id = EXCLUDED.dag_id AND %(refresh)s
    RETURNING name
)
SELECT name FROM written
UNION
SELECT d.name FROM datasets d JOIN c ON c.name = d.name
WHERE d.org_id = %(org_id)s AND d.dag_id = %(dag_id)s;

-- name: sync_writers
-- Register this DAG as a writer of the multi_writer datasets of other DAGs it publishes
-- (%(rows)s: [{dataset_uuid, job, output}]). With %(refresh)s (a version going live) existing
-- rows move to the new job/output and the DAG's rows for datasets it no longer publishes are
-- removed; without (a staging) only new rows are added.
WITH c AS (
    SELECT * FROM jsonb_to_recordset(%(rows)s::jsonb)
        AS c(dataset_uuid uuid, job text, output int)
), upsert AS (
    INSERT INTO dataset_writers (dataset_uuid, dag_id, job_name, output_index)
    SELECT c.dataset_uuid, %(dag_id)s, c.job, c.output FROM c
    ON CONFLICT (dataset_uuid, dag_id) DO UPDATE
    SET job_name = EXCLUDED.job_name, output_index = EXCLUDED.output_index
    WHERE %(refresh)s
    RETURNING dataset_uuid
)
DELETE FROM dataset_writers w
WHERE %(refresh)s AND w.dag_id = %(dag_id)s
  AND w.dataset_uuid NOT IN (SELECT dataset_uuid FROM c);

