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
SELECT dag_id::text AS dag_id, active_version, active_generation FROM dags
WHERE org_id = %(org_id)s AND name = %(name)s FOR UPDATE;

-- name: dag
-- A DAG of an org with its active version and pointer set (no lock).
SELECT dag_id::text AS dag_id, active_version, active_generation FROM dags
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
INSERT INTO dag_inputs (dag_id, version, job, input_index, from_job, from_output, from_dataset,
                        where_filter)
SELECT %(dag_id)s, %(version)s, i.job, i.input_index, i.from_job, i.from_output, i.from_dataset,
       i.where_filter
FROM unnest(%(jobs)s::text[], %(indexes)s::int[], %(from_jobs)s::text[],
            %(from_outputs)s::int[], %(from_datasets)s::text[], %(wheres)s::jsonb[])
     AS i(job, input_index, from_job, from_output, from_dataset, where_filter);

-- name: activate_version
-- Make a version the DAG's active one.
UPDATE dags SET active_version = %(version)s WHERE dag_id = %(dag_id)s;

-- name: upsert_published
-- Register a version's published outputs (one JSON array of rows, names unique) as datasets of
-- this DAG, or move existing ones of this DAG to their new job/output; a name another DAG
-- produces is left alone (no row returned for it).
WITH c AS (
    SELECT * FROM jsonb_to_recordset(%(rows)s::jsonb)
        AS c(name text, job text, output int, storage_kind text, schema jsonb,
             update_strategy text, unique_key jsonb, multi_writer boolean)
)
INSERT INTO datasets (dataset_uuid, org_id, name, dag_id, job_name, output_index, storage_kind,
                      schema, update_strategy, unique_key, multi_writer)
SELECT gen_random_uuid(), %(org_id)s, c.name, %(dag_id)s, c.job, c.output, c.storage_kind,
       c.schema, c.update_strategy, ARRAY(SELECT jsonb_array_elements_text(c.unique_key)),
       c.multi_writer
FROM c
ON CONFLICT (org_id, name) DO UPDATE
SET job_name = EXCLUDED.job_name, output_index = EXCLUDED.output_index,
    storage_kind = EXCLUDED.storage_kind, schema = EXCLUDED.schema,
    update_strategy = EXCLUDED.update_strategy, unique_key = EXCLUDED.unique_key,
    multi_writer = EXCLUDED.multi_writer
WHERE datasets.dag_id = EXCLUDED.dag_id
RETURNING name;

-- name: insert_published
-- Register a version's published outputs whose names are new (a staging: the live version keeps
-- its metadata until the cutover); answers every name this DAG now has (the new ones and those
-- it already had), so a name another DAG produces answers no row.
WITH c AS (
    SELECT * FROM jsonb_to_recordset(%(rows)s::jsonb)
        AS c(name text, job text, output int, storage_kind text, schema jsonb,
             update_strategy text, unique_key jsonb, multi_writer boolean)
), ins AS (
    INSERT INTO datasets (dataset_uuid, org_id, name, dag_id, job_name, output_index,
                          storage_kind, schema, update_strategy, unique_key, multi_writer)
    SELECT gen_random_uuid(), %(org_id)s, c.name, %(dag_id)s, c.job, c.output, c.storage_kind,
           c.schema, c.update_strategy, ARRAY(SELECT jsonb_array_elements_text(c.unique_key)),
           c.multi_writer
    FROM c
    ON CONFLICT (org_id, name) DO NOTHING
    RETURNING name
)
SELECT name FROM ins
UNION ALL
SELECT d.name FROM datasets d JOIN c ON c.name = d.name
WHERE d.org_id = %(org_id)s AND d.dag_id = %(dag_id)s;

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

-- name: source_job
-- A job of a DAG as new tasks are created from it (dag_live_jobs: the active version, or the
-- staged one for a job a staging rebuilds), with whether it is a source (no inputs), for a
-- trigger.
SELECT j.dag_id::text AS dag_id, j.version, j.operator, j.runtime, j.config::text AS config,
       j.timeout_s, j.max_attempts, j.triggers::text AS triggers, j.epoch,
       NOT EXISTS (SELECT 1 FROM dag_inputs i
                   WHERE (i.dag_id, i.version, i.job) = (j.dag_id, j.version, j.job)) AS is_source
FROM dag_live_jobs j
WHERE j.org_id = %(org_id)s AND j.dag = %(dag)s AND j.job = %(job)s;

-- name: insert_dag_tasks
-- Create tasks of DAG jobs in the state the kernel chose (decide_create), with their read grants
-- (trace_lite.dag_grants; a JSON array of dataset names per task); a task whose idempotency key
-- its org already has is skipped (a repeated trigger, schedule slot or event). The batch is one
-- JSON array of rows (one parameter: no per-element array quoting).
INSERT INTO tasks (task_id, org_id, operator, payload, state, max_attempts, timeout_s,
                   idempotency_key, runtime, dag_id, dag_version, dag_job, read_datasets)
SELECT c.task_id, c.org_id, c.operator, c.payload, c.state, c.max_attempts, c.timeout_s,
       c.idempotency_key, c.runtime, c.dag_id, c.dag_version, c.dag_job,
       ARRAY(SELECT jsonb_array_elements_text(c.read_datasets))
FROM jsonb_to_recordset(%(rows)s::jsonb)
     AS c(task_id uuid, org_id uuid, operator text, payload jsonb, state text, max_attempts int,
          timeout_s int, idempotency_key text, runtime text, dag_id uuid, dag_version bigint,
          dag_job text, read_datasets jsonb)
ON CONFLICT (org_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
RETURNING task_id::text AS task_id, state;

-- name: task_by_key
-- The task an idempotency key of an org already created.
SELECT task_id::text AS task_id, state FROM tasks
WHERE org_id = %(org_id)s AND idempotency_key = %(idempotency_key)s;

-- name: insert_task_inputs
-- Lineage of tasks created for events: the event and the dataset version the input reads (one
-- JSON array of rows).
INSERT INTO task_inputs (task_id, input_index, producer_task_id, event_key, event_seq,
                         dataset_uuid, dataset_version)
SELECT * FROM jsonb_to_recordset(%(rows)s::jsonb)
     AS c(task_id uuid, input_index int, producer_task_id uuid, event_key text, event_seq bigint,
          dataset_uuid uuid, dataset_version uuid)
ON CONFLICT DO NOTHING;

-- name: claim_dag_events
-- Lock announced events of DAG tasks for one fan-out pass; concurrent passes skip each other's.
SELECT id, tries FROM outbox
WHERE topic = %(topic)s AND state = 'pending' AND available_at <= now()
ORDER BY available_at, id
LIMIT %(batch)s
FOR UPDATE SKIP LOCKED;

-- name: fan_out_plan
-- For claimed announcements: each event with every consuming live job (dag_live_jobs) -- the
-- producer's own DAG reading it with from: {job, output}, and DAGs of the org reading the
-- dataset that output publishes with from: {dataset} -- the consumer's task settings and epoch,
-- and the dataset version the input reads (the producing DAG's active pointer; a staged
-- producer's: its staged pointer set). An event belongs to output payload.output when that is
-- an integer, else output 0. Stagings decide the rest (docs/architecture/dag_deployment.md,
-- "Rematerialization"):
-- * an event of a staged task reaches only the staged jobs of its DAG;
-- * an event of a task of an abandoned staging reaches nothing;
-- * an event of a task of a version older than a cutover that rebuilt its job reaches nothing
--   of its own DAG (the rebuild replayed that job's inputs);
-- * a staged consumer of an event of a task that is not staged is "held": the announcement
--   waits for the cutover.
WITH ev AS (
    SELECT o.id AS outbox_id, e.task_id, e.event_key, e.seq, e.event_type, e.payload, t.org_id,
           t.dag_id, t.dag_job, t.dag_version,
           CASE WHEN jsonb_typeof(e.payload -> 'output') = 'number'
                THEN (e.payload ->> 'output')::int ELSE 0 END AS output,
           m.generation AS staged_generation,
           EXISTS (SELECT 1 FROM dag_rematerializations a
                   WHERE a.dag_id = t.dag_id AND a.version = t.dag_version
                     AND a.state = 'abandoned') AS abandoned,
           EXISTS (SELECT 1 FROM dag_rematerializations c JOIN dags cg ON cg.dag_id = c.dag_id
                   WHERE c.dag_id = t.dag_id AND c.state = 'cut_over'
                     AND c.version > t.dag_version AND c.version <= cg.active_version
                     AND t.dag_job = ANY(c.rebuild)) AS superseded
    FROM outbox o
    JOIN task_events e ON e.task_id = (o.payload ->> 'task_id')::uuid
                      AND e.event_key = o.payload ->> 'event_key'
    JOIN tasks t ON t.task_id = e.task_id
    LEFT JOIN dag_rematerializations m ON m.dag_id = t.dag_id AND m.version = t.dag_version
                                      AND m.state = 'building'
    WHERE o.id = ANY(%(ids)s::bigint[])
), live AS MATERIALIZED (
    -- the versions new tasks of the events' DAGs are created in (dag_live_jobs, inlined so
    -- every join below is by key): the active one but for the jobs a building staging
    -- rebuilds, and the staged one for those jobs
    SELECT g.dag_id, g.active_version AS version, false AS staged,
           coalesce(m.rebuild, '{}') AS rebuild
    FROM dags g
    LEFT JOIN dag_rematerializations m ON m.dag_id = g.dag_id AND m.state = 'building'
    WHERE g.dag_id IN (SELECT dag_id FROM ev) AND g.active_version IS NOT NULL
    UNION ALL
    SELECT m.dag_id, m.version, true, m.rebuild FROM dag_rematerializations m
    WHERE m.dag_id IN (SELECT dag_id FROM ev) AND m.state = 'building'
), consumers AS (
    SELECT ev.outbox_id, i.dag_id, i.version, i.job, i.input_index, live.staged,
           i.where_filter
    FROM ev JOIN live ON live.dag_id = ev.dag_id
    JOIN dag_inputs i ON (i.dag_id, i.version, i.from_job, i.from_output)
                       = (live.dag_id, live.version, ev.dag_job, ev.output)
    WHERE NOT ev.abandoned AND NOT ev.superseded
      AND (i.job = ANY(live.rebuild)) = live.staged
      AND (ev.staged_generation IS NULL OR live.staged)
    UNION ALL
    SELECT ev.outbox_id, i.dag_id, i.version, i.job, i.input_index,
           i.version IS NOT DISTINCT FROM rm.version, i.where_filter
    FROM ev JOIN datasets d ON d.org_id = ev.org_id AND (
             (d.dag_id = ev.dag_id AND d.job_name = ev.dag_job AND d.output_index = ev.output)
             -- a sink's rows_committed event names its dataset: every writer of a multi_writer
             -- dataset reaches its readers (trace_lite.sink)
             OR (starts_with(ev.event_key, 'sink/')
                 AND d.dataset_uuid::text = ev.payload ->> 'dataset_uuid'))
    JOIN dag_inputs i ON i.from_dataset = d.name
    JOIN dags rg ON rg.dag_id = i.dag_id AND rg.org_id = ev.org_id
    LEFT JOIN dag_rematerializations rm ON rm.dag_id = rg.dag_id AND rm.state = 'building'
    WHERE NOT ev.abandoned AND ev.staged_generation IS NULL
      AND ((i.version = rg.active_version AND NOT (i.job = ANY(coalesce(rm.rebuild, '{}'))))
           OR (i.version = rm.version AND i.job = ANY(rm.rebuild)))
)
SELECT ev.outbox_id, ev.task_id::text AS producer_task_id, ev.event_key, ev.seq AS event_seq,
       ev.event_type,
       ev.payload::text AS event_payload, ev.output, ev.org_id::text AS org_id,
       k.dag_id::text AS dag_id, k.version, k.job, k.input_index, j.operator, j.runtime,
       j.config::text AS config, j.timeout_s, j.max_attempts,
       (SELECT max(e.version) FROM dag_rematerializations e
        WHERE e.dag_id = k.dag_id AND e.state IN ('cut_over', 'building')
          AND e.version <= k.version AND k.job = ANY(e.rebuild)) AS epoch,
       k.staged AND ev.staged_generation IS NULL AS held,
       pd.dataset_uuid::text AS dataset_uuid, ptr.dataset_version::text AS dataset_version,
       CASE WHEN k.where_filter IS NOT NULL THEN k.where_filter
            ELSE cv.spec #> ARRAY['jobs', k.job, 'inputs', k.input_index::text, 'where']
       END AS input_where
FROM ev
JOIN consumers k ON k.outbox_id = ev.outbox_id
JOIN dag_jobs j ON (j.dag_id, j.version, j.job) = (k.dag_id, k.version, k.job)
JOIN dag_versions cv ON (cv.dag_id, cv.version) = (k.dag_id, k.version)
LEFT JOIN datasets pd ON pd.org_id = ev.org_id AND (
              (pd.dag_id = ev.dag_id AND pd.job_name = ev.dag_job AND pd.output_index = ev.output)
              OR (starts_with(ev.event_key, 'sink/')
                  AND pd.dataset_uuid::text = ev.payload ->> 'dataset_uuid'))
LEFT JOIN dags pg ON pg.dag_id = ev.dag_id
LEFT JOIN dag_pointers ptr ON ptr.dag_id = pg.dag_id
                          AND ptr.generation = coalesce(ev.staged_generation, pg.active_generation)
                          AND ptr.dataset_uuid = pd.dataset_uuid
ORDER BY ev.seq, k.dag_id, k.job, k.input_index;

-- name: mark_events_consumed
-- Record consumed announcements as the kernel decided (decide_sent: published, tries + 1), in
-- the transaction that created their tasks.
UPDATE outbox o
SET state = c.state, tries = c.tries, published_at = now()
FROM unnest(%(ids)s::bigint[], %(states)s::text[], %(tries)s::int[]) AS c(id, state, tries)
WHERE o.id = c.id AND o.state = 'pending';

-- name: scheduled_jobs
-- Live jobs (dag_live_jobs) with a cron or interval trigger, the time their version was
-- deployed, and the database's now (schedules never read a worker's clock).
SELECT j.org_id::text AS org_id, j.dag_id::text AS dag_id, j.dag, j.version, j.job, j.operator,
       j.runtime, j.config::text AS config, j.timeout_s, j.max_attempts,
       j.triggers::text AS triggers, j.deployed_at, j.epoch, now() AS now
FROM dag_live_jobs j
WHERE j.triggers @> '[{"type": "cron"}]' OR j.triggers @> '[{"type": "interval"}]';

-- name: datasets_without_version
-- The datasets a DAG produces that its active pointer set does not point at yet (registered by
-- this deploy), with the active generation the first versions are cut over from.
SELECT d.dataset_uuid::text AS dataset_uuid, g.active_generation
FROM datasets d JOIN dags g ON g.dag_id = d.dag_id
WHERE d.dag_id = %(dag_id)s
  AND NOT EXISTS (SELECT 1 FROM dag_pointers p
                  WHERE p.dag_id = g.dag_id AND p.generation = g.active_generation
                    AND p.dataset_uuid = d.dataset_uuid)
ORDER BY d.name;

-- name: record_deploy
-- Record a deploy's activation (the new version with the pointer set now active); a rollback of
-- it restores the activation before it.
INSERT INTO dag_activations (dag_id, seq, version, generation, previous_seq, reason, created_by)
SELECT g.dag_id, coalesce(a.seq, 0) + 1, g.active_version, g.active_generation, a.seq, 'deploy',
       %(created_by)s
FROM dags g
CROSS JOIN LATERAL (SELECT max(seq) AS seq FROM dag_activations WHERE dag_id = g.dag_id) a
WHERE g.dag_id = %(dag_id)s;

-- name: lock_live_versions
-- The active version and the building staging (version, rebuilt jobs) of the DAGs tasks are
-- about to be created for, the DAG rows locked FOR SHARE so a deploy, cutover or rollback
-- (FOR UPDATE) waits for the creating transaction, or the creator sees its result.
SELECT g.dag_id::text AS dag_id, g.active_version, m.version AS staged_version,
       coalesce(m.rebuild, '{}') AS rebuild
FROM dags g
LEFT JOIN dag_rematerializations m ON m.dag_id = g.dag_id AND m.state = 'building'
WHERE g.dag_id = ANY(%(dag_ids)s::uuid[])
ORDER BY g.dag_id
FOR SHARE OF g;

-- name: hold_events
-- Announcements with a held consumer wait for their staging's cutover (or abandonment), which
-- makes them due again (dag_remat.sql release_held); the consumers not held were created.
UPDATE outbox SET available_at = 'infinity'
WHERE id = ANY(%(ids)s::bigint[]) AND state = 'pending';
