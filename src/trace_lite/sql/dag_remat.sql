-- Rematerialization (trace_lite.dag_remat): stage a deploy's version with its own pointer set,
-- replay the rebuilt jobs' inputs into it, cut over (version + pointer set in one transaction)
-- when the rebuild is complete, or abandon it. Migration 0018 holds dag_rematerializations and
-- the dag_live_jobs view.

-- name: building
-- A DAG's building staging (at most one), if any.
SELECT version, from_version, generation, rebuild FROM dag_rematerializations
WHERE dag_id = %(dag_id)s AND state = 'building';

-- name: datasets_to_version
-- The datasets of a DAG that a staging gives a new version: those published by a rebuilt job
-- (by the staged spec's publish list, name -> job), and those the active pointer set does not
-- point at yet (registered by this deploy). One row per dataset, also for a multi_writer
-- dataset that several rebuilt jobs publish.
SELECT d.dataset_uuid::text AS dataset_uuid
FROM datasets d JOIN dags g ON g.dag_id = d.dag_id
WHERE d.dag_id = %(dag_id)s
  AND (EXISTS (SELECT 1 FROM unnest(%(names)s::text[], %(jobs)s::text[]) AS p(name, job)
               WHERE p.name = d.name AND p.job = ANY(%(rebuild)s::text[]))
       OR NOT EXISTS (SELECT 1 FROM dag_pointers x
                      WHERE x.dag_id = g.dag_id AND x.generation = g.active_generation
                        AND x.dataset_uuid = d.dataset_uuid))
ORDER BY d.name;

-- name: insert_versions
-- Open a new (empty) version of each dataset (the registry's insert_version, batched).
INSERT INTO dataset_versions (dataset_version, dataset_uuid)
SELECT gen_random_uuid(), u FROM unnest(%(uuids)s::uuid[]) AS u
RETURNING dataset_uuid::text AS dataset_uuid, dataset_version::text AS dataset_version;

-- name: insert_staged_pointer_set
-- A staged pointer set: a new generation = the active set overlaid with the new versions
-- (trace_insert_pointer_set, migration 0033); the active generation does not move (readers keep
-- the old versions until the cutover).
SELECT trace_insert_pointer_set(%(dag_id)s::uuid, %(parent)s::bigint, %(created_by)s::text,
                                %(dataset_uuids)s::uuid[], %(versions)s::uuid[]) AS generation;

-- name: insert_staging
-- Record a building staging.
INSERT INTO dag_rematerializations (dag_id, version, from_version, generation, rebuild, created_by)
VALUES (%(dag_id)s, %(version)s, %(from_version)s, %(generation)s, %(rebuild)s, %(created_by)s);

-- name: replay_events
-- The events a staging replays into its rebuilt jobs: for each input of a rebuilt job that is
-- fed from outside the rebuild (an unaffected job of the DAG, or another DAG's dataset), every
-- event of the producing job's tasks on that output -- except events of abandoned stagings'
-- tasks, of tasks of a building staging, and of tasks older than a cutover that rebuilt their
-- job (that cutover's replay stands for them). Shaped like fan_out_plan's rows (dags.sql).
WITH r AS (
    SELECT i.dag_id, i.version, i.job, i.input_index, i.from_job, i.from_output, i.from_dataset,
           i.where_filter
    FROM dag_inputs i
    WHERE i.dag_id = %(dag_id)s AND i.version = %(version)s AND i.job = ANY(%(rebuild)s::text[])
      AND (i.from_dataset IS NOT NULL OR NOT (i.from_job = ANY(%(rebuild)s::text[])))
), src AS (
    SELECT r.dag_id, r.version, r.job, r.input_index, r.where_filter,
           r.dag_id AS p_dag, r.from_job AS p_job, r.from_output AS p_output
    FROM r WHERE r.from_job IS NOT NULL
    UNION ALL
    SELECT r.dag_id, r.version, r.job, r.input_index, r.where_filter, d.dag_id, d.job_name,
           d.output_index
    FROM r JOIN dags g ON g.dag_id = r.dag_id
    JOIN datasets d ON d.org_id = g.org_id AND d.name = r.from_dataset
)
SELECT NULL::bigint AS outbox_id, e.task_id::text AS producer_task_id, e.event_key,
       e.seq AS event_seq, e.event_type, e.payload::text AS event_payload, src.p_output AS output,
       t.org_id::text AS org_id, src.dag_id::text AS dag_id, src.version, src.job,
       src.input_index, j.operator, j.runtime, j.config::text AS config, j.timeout_s,
       j.max_attempts, %(version)s::bigint AS epoch, false AS held,
       pd.dataset_uuid::text AS dataset_uuid, ptr.dataset_version::text AS dataset_version,
       src.where_filter AS input_where
FROM src
JOIN tasks t ON t.dag_id = src.p_dag AND t.dag_job = src.p_job
JOIN task_events e ON e.task_id = t.task_id
                  AND trace_event_output(e.payload) = src.p_output
JOIN dag_jobs j ON (j.dag_id, j.version, j.job) = (src.dag_id, src.version, src.job)
LEFT JOIN datasets pd ON pd.dag_id = src.p_dag AND pd.job_name = src.p_job
                     AND pd.output_index = src.p_output
LEFT JOIN dags pg ON pg.dag_id = src.p_dag
LEFT JOIN dag_pointers ptr ON ptr.dag_id = pg.dag_id AND ptr.generation = pg.active_generation
                          AND ptr.dataset_uuid = pd.dataset_uuid
WHERE NOT EXISTS (SELECT 1 FROM dag_rematerializations m
                  WHERE m.dag_id = t.dag_id AND m.version = t.dag_version
                    AND m.state IN ('abandoned', 'building'))
  AND NOT EXISTS (SELECT 1 FROM dag_rematerializations c
                  WHERE c.dag_id = t.dag_id AND c.state = 'cut_over'
                    AND c.version > t.dag_version AND t.dag_job = ANY(c.rebuild))
ORDER BY e.seq, src.job, src.input_index;

-- name: replay_runs
-- The runs a staging replays into its rebuilt source jobs: the latest task of each run (its
-- idempotency key without an epoch) that was not canceled, with the config of the version it
-- ran and the staged job's settings.
SELECT DISTINCT ON (base)
       regexp_replace(t.idempotency_key, '@[0-9]+$', '') AS base, t.org_id::text AS org_id,
       t.dag_job AS job, t.payload::text AS payload, oj.config::text AS old_config,
       j.operator, j.runtime, j.config::text AS config, j.timeout_s, j.max_attempts
FROM tasks t
JOIN dag_jobs oj ON (oj.dag_id, oj.version, oj.job) = (t.dag_id, t.dag_version, t.dag_job)
JOIN dag_jobs j ON (j.dag_id, j.version, j.job) = (t.dag_id, %(version)s, t.dag_job)
WHERE t.dag_id = %(dag_id)s AND t.dag_job = ANY(%(sources)s::text[])
  AND t.state <> 'canceled' AND t.idempotency_key IS NOT NULL
  AND NOT EXISTS (SELECT 1 FROM dag_rematerializations m
                  WHERE m.dag_id = t.dag_id AND m.version = t.dag_version
                    AND m.state = 'abandoned')
ORDER BY base, t.created_at DESC;

-- name: ready
-- Building stagings whose rebuild is complete: every task of the staged version completed and
-- every event those tasks recorded fanned out. One DAG (dag_id) or all (NULL).
SELECT m.dag_id::text AS dag_id, m.version, m.from_version, m.generation, m.rebuild
FROM dag_rematerializations m
WHERE m.state = 'building' AND (%(dag_id)s::uuid IS NULL OR m.dag_id = %(dag_id)s::uuid)
  AND NOT EXISTS (SELECT 1 FROM tasks t
                  WHERE t.dag_id = m.dag_id AND t.dag_version = m.version
                    AND t.state <> 'completed')
  AND NOT EXISTS (SELECT 1 FROM outbox o JOIN tasks t ON t.task_id = (o.payload ->> 'task_id')::uuid
                  WHERE o.topic = 'dag.event' AND o.state = 'pending'
                    AND t.dag_id = m.dag_id AND t.dag_version = m.version)
ORDER BY m.created_at;

-- name: lock_dag_by_id
-- A DAG's row with its active pair, locked for a cutover.
SELECT dag_id::text AS dag_id, org_id::text AS org_id, active_version, active_generation
FROM dags WHERE dag_id = %(dag_id)s FOR UPDATE;

-- name: parent_generation
-- The pointer set a staged generation was overlaid on.
SELECT parent_generation FROM dag_pointer_sets
WHERE dag_id = %(dag_id)s AND generation = %(generation)s;

-- name: staged_pointers
-- The pointers of a staged generation that its parent does not have (the new versions).
SELECT p.dataset_uuid::text AS dataset_uuid, p.dataset_version::text AS dataset_version
FROM dag_pointers p
WHERE p.dag_id = %(dag_id)s AND p.generation = %(generation)s
  AND NOT EXISTS (SELECT 1 FROM dag_pointers q
                  WHERE q.dag_id = p.dag_id AND q.generation = %(parent)s
                    AND q.dataset_uuid = p.dataset_uuid
                    AND q.dataset_version = p.dataset_version);

-- name: go_live
-- The cutover's switch: the staged version and a pointer set become the active pair
-- (compare-and-swap on the pair read under the lock).
UPDATE dags SET active_version = %(version)s, active_generation = %(generation)s
WHERE dag_id = %(dag_id)s AND active_version = %(expected_version)s
  AND active_generation IS NOT DISTINCT FROM %(expected_generation)s
RETURNING active_version;

-- name: end_staging
-- A staging ends: cut_over or abandoned.
UPDATE dag_rematerializations SET state = %(state)s, ended_at = now()
WHERE dag_id = %(dag_id)s AND version = %(version)s AND state = 'building';

-- name: record_cutover
-- Record a cutover's activation (a rollback of it restores the activation before it).
INSERT INTO dag_activations (dag_id, seq, version, generation, previous_seq, reason, created_by)
SELECT g.dag_id, coalesce(a.seq, 0) + 1, g.active_version, g.active_generation, a.seq, 'cutover',
       %(created_by)s
FROM dags g
CROSS JOIN LATERAL (SELECT max(seq) AS seq FROM dag_activations WHERE dag_id = g.dag_id) a
WHERE g.dag_id = %(dag_id)s;

-- name: cancel_jobs_except
-- Cancel the unfinished tasks of some jobs of a DAG in every version but one (a cutover: the
-- rebuilt jobs' old work), or of one version (an abandoned staging: version_only); answers
-- the state each canceled task was in.
WITH c AS (
    SELECT task_id, state FROM tasks
    WHERE dag_id = %(dag_id)s AND state = ANY(%(states)s::text[])
      AND dag_job = ANY(%(jobs)s::text[])
      AND (CASE WHEN %(version_only)s THEN dag_version = %(version)s
                ELSE dag_version <> %(version)s END)
    FOR UPDATE
)
UPDATE tasks t SET state = 'canceled', finished_at = now(), updated_at = now()
FROM c WHERE t.task_id = c.task_id AND t.state = c.state
RETURNING c.state AS was;

-- name: release_held
-- Make every held announcement due again: the fan-out plans it against what is live now (a
-- consumer still staged holds it again).
UPDATE outbox SET available_at = now()
WHERE topic = 'dag.event' AND state = 'pending' AND available_at = 'infinity';

-- name: staging_counts
-- The tasks of each rebuilt job of a staged version by state.
SELECT j.job, t.state, count(t.task_id) AS n
FROM dag_jobs j
LEFT JOIN tasks t ON t.dag_id = j.dag_id AND t.dag_version = j.version AND t.dag_job = j.job
WHERE j.dag_id = %(dag_id)s AND j.version = %(version)s AND j.job = ANY(%(rebuild)s::text[])
GROUP BY j.job, t.state
ORDER BY j.job, t.state;

-- name: waiting_events
-- Announced events of a DAG's tasks held for a staging (an announcement names the events of one
-- statement, migration 0032; one from before it names one).
SELECT coalesce(sum(jsonb_array_length(trace_announced_keys(o.payload))), 0) AS n
FROM outbox o JOIN tasks t ON t.task_id = (o.payload ->> 'task_id')::uuid
WHERE o.topic = 'dag.event' AND o.state = 'pending' AND o.available_at = 'infinity'
  AND t.dag_id = %(dag_id)s;
