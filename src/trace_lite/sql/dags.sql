-- Deployed DAGs (trace_lite.dags, trace_lite.dag_runs): versions, jobs, edges, the registry
-- facts validation needs, DAG tasks (triggers, schedules, fan-out) and their lineage. The kernel
-- (trace_core.dag, trace_core.access, trace_core.lifecycle) decides; these statements read and
-- apply. Migration 0011 holds the tables.

-- name: ensure_dag
-- Create a DAG row if missing (a first deploy); nothing when it exists.
INSERT INTO dags (dag_id, org_id, name) VALUES (gen_random_uuid(), %(org_id)s, %(name)s)
ON CONFLICT (org_id, name) DO NOTHING;

-- name: lock_dag
-- A DAG of an org with its active version, locked for a deploy (deploys of one DAG serialize).
SELECT dag_id::text AS dag_id, active_version FROM dags
WHERE org_id = %(org_id)s AND name = %(name)s FOR UPDATE;

-- name: dag
-- A DAG of an org with its active version (no lock).
SELECT dag_id::text AS dag_id, active_version FROM dags
WHERE org_id = %(org_id)s AND name = %(name)s;

-- name: deployers
-- The subjects that deploy a DAG (dag_members relation 'deployer').
SELECT subject FROM dag_members WHERE dag_id = %(dag_id)s AND relation = 'deployer';

-- name: add_deployer
-- Make the subject that first deployed a DAG one of its deployers.
INSERT INTO dag_members (dag_id, subject, relation) VALUES (%(dag_id)s, %(subject)s, 'deployer')
ON CONFLICT DO NOTHING;

-- name: registry_facts
-- What validation needs of every dataset of an org: its producing DAG, multi-writer, schema.
SELECT d.name, g.name AS producer_dag, d.multi_writer, d.schema
FROM datasets d JOIN dags g ON g.dag_id = d.dag_id
WHERE d.org_id = %(org_id)s;

-- name: version_spec
-- One version of a DAG: its digest and spec (as text: parsed by trace_core.dag.parse).
SELECT version, digest, spec::text AS spec, created_by, created_at
FROM dag_versions WHERE dag_id = %(dag_id)s AND version = %(version)s;

-- name: next_version
-- The number the next version of a DAG gets.
SELECT coalesce(max(version), 0) + 1 AS version FROM dag_versions WHERE dag_id = %(dag_id)s;

-- name: insert_version
-- Store a new immutable version.
INSERT INTO dag_versions (dag_id, version, digest, spec, created_by)
VALUES (%(dag_id)s, %(version)s, %(digest)s, %(spec)s, %(created_by)s);

-- name: insert_jobs
-- The jobs of a new version.
INSERT INTO dag_jobs (dag_id, version, job, operator, runtime, config, timeout_s, max_attempts,
                      triggers)
SELECT %(dag_id)s, %(version)s, j.job, j.operator, j.runtime, j.config, j.timeout_s,
       j.max_attempts, j.triggers
FROM unnest(%(jobs)s::text[], %(operators)s::text[], %(runtimes)s::text[],
            %(configs)s::jsonb[], %(timeouts)s::int[], %(max_attempts)s::int[],
            %(triggers)s::jsonb[])
     AS j(job, operator, runtime, config, timeout_s, max_attempts, triggers);

-- name: insert_inputs
-- The input edges of a new version.
INSERT INTO dag_inputs (dag_id, version, job, input_index, from_job, from_output, from_dataset)
SELECT %(dag_id)s, %(version)s, i.job, i.input_index, i.from_job, i.from_output, i.from_dataset
FROM unnest(%(jobs)s::text[], %(indexes)s::int[], %(from_jobs)s::text[],
            %(from_outputs)s::int[], %(from_datasets)s::text[])
     AS i(job, input_index, from_job, from_output, from_dataset);

-- name: activate_version
-- Make a version the DAG's active one.
UPDATE dags SET active_version = %(version)s WHERE dag_id = %(dag_id)s;

-- name: upsert_published
-- Register a published output as a dataset of this DAG (or move an existing one of this DAG to
-- its new job/output); a name another DAG produces is left alone (no row returned).
INSERT INTO datasets (dataset_uuid, org_id, name, dag_id, job_name, output_index, storage_kind,
                      schema, update_strategy, unique_key, multi_writer)
VALUES (gen_random_uuid(), %(org_id)s, %(name)s, %(dag_id)s, %(job)s, %(output)s,
        %(storage_kind)s, %(schema)s, %(update_strategy)s, %(unique_key)s, %(multi_writer)s)
ON CONFLICT (org_id, name) DO UPDATE
SET job_name = EXCLUDED.job_name, output_index = EXCLUDED.output_index,
    storage_kind = EXCLUDED.storage_kind, schema = EXCLUDED.schema,
    update_strategy = EXCLUDED.update_strategy, unique_key = EXCLUDED.unique_key,
    multi_writer = EXCLUDED.multi_writer
WHERE datasets.dag_id = EXCLUDED.dag_id
RETURNING dataset_uuid::text AS dataset_uuid;

-- name: list_dags
-- The DAGs of an org with their active version.
SELECT g.name, g.active_version, v.digest, v.created_by, v.created_at
FROM dags g LEFT JOIN dag_versions v ON v.dag_id = g.dag_id AND v.version = g.active_version
WHERE g.org_id = %(org_id)s ORDER BY g.name;

-- name: list_versions
-- Every version of a DAG, newest first.
SELECT version, digest, created_by, created_at
FROM dag_versions WHERE dag_id = %(dag_id)s ORDER BY version DESC;

-- name: published_by
-- The datasets a DAG produces (the registry's view of its publish list).
SELECT name, job_name AS job, output_index AS output, dataset_uuid::text AS dataset_uuid
FROM datasets WHERE dag_id = %(dag_id)s ORDER BY name;
