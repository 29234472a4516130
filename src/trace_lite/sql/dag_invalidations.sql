-- Invalidation cascades (trace_lite.dag_invalidations): given a replaced scope (a block range
-- or a partition key) of a dataset version, find the DAG tasks whose input read it (task_inputs
-- lineage, the producing event's payload) and rerun them. Migration 0018 indexes
-- task_inputs by dataset.

-- name: target
-- A dataset of an org with the version to invalidate: the one named, else its producing DAG's
-- active pointer.
SELECT d.dataset_uuid::text AS dataset_uuid, d.job_name, d.output_index,
       coalesce(%(version)s::uuid, p.dataset_version)::text AS dataset_version
FROM datasets d
JOIN dags g ON g.dag_id = d.dag_id
LEFT JOIN dag_pointers p ON p.dag_id = g.dag_id AND p.generation = g.active_generation
                        AND p.dataset_uuid = d.dataset_uuid
WHERE d.org_id = %(org_id)s AND d.name = %(name)s;

-- name: target_by_uuid
-- The dataset of an invalidation outbox row (a replace commit names it by uuid).
SELECT d.dataset_uuid::text AS dataset_uuid, d.job_name, d.output_index,
       %(version)s::text AS dataset_version, d.org_id::text AS org_id, d.name
FROM datasets d WHERE d.dataset_uuid = %(dataset_uuid)s;

-- name: live_producers
-- The live partitions of a version inside the scope: the newest partition id (what a rerun's
-- key is made of) and the tasks that committed them (the current producers).
SELECT coalesce(max(partition_id), 0) AS newest,
       coalesce(array_agg(DISTINCT task_id::text), '{}') AS task_ids
FROM dataset_partitions
WHERE dataset_version = %(version)s AND superseded_at IS NULL
  AND ((%(key)s::text IS NOT NULL AND partition_key = %(key)s)
       OR (%(start)s::bigint IS NOT NULL
           AND range_start < %(end)s::bigint AND range_end > %(start)s::bigint));

-- name: announced_by
-- Whether one of the given tasks recorded an event of the dataset's output covering the scope:
-- then the fan-out of that event reruns every consumer, and the cascade creates nothing.
SELECT EXISTS (
    SELECT 1 FROM task_events e
    WHERE e.task_id = ANY(%(task_ids)s::uuid[])
      AND trace_event_output(e.payload) = %(output)s
      AND ((%(key)s::text IS NOT NULL AND e.payload ->> 'partition_key' = %(key)s)
           OR (%(start)s::bigint IS NOT NULL
               AND jsonb_typeof(e.payload -> 'start') = 'number'
               AND jsonb_typeof(e.payload -> 'end') = 'number'
               AND (e.payload ->> 'start')::numeric < %(end)s::bigint
               AND (e.payload ->> 'end')::numeric > %(start)s::bigint))
) AS announced;

-- name: dependents
-- One row per (consuming DAG job, input, producing event) whose task read the dataset inside
-- the scope (task_inputs; the event's payload says which range or key it announced), with the
-- consuming job's settings in its DAG's active version and whether that job is being rebuilt
-- by a staged version (then the rebuild reads the new data and no rerun is made).
WITH dep AS (
    SELECT DISTINCT ON (t.dag_id, t.dag_job, ti.input_index, ti.producer_task_id, ti.event_key)
           ti.task_id, ti.input_index, ti.producer_task_id, ti.event_key, ti.event_seq,
           t.org_id, t.dag_id, t.dag_job
    FROM task_inputs ti
    JOIN tasks t ON t.task_id = ti.task_id
    JOIN task_events e ON e.task_id = ti.producer_task_id AND e.event_key = ti.event_key
    WHERE ti.dataset_uuid = %(dataset_uuid)s AND t.state <> 'canceled'
      AND ((%(key)s::text IS NOT NULL AND e.payload ->> 'partition_key' = %(key)s)
           OR (%(start)s::bigint IS NOT NULL
               AND jsonb_typeof(e.payload -> 'start') = 'number'
               AND jsonb_typeof(e.payload -> 'end') = 'number'
               AND (e.payload ->> 'start')::numeric < %(end)s::bigint
               AND (e.payload ->> 'end')::numeric > %(start)s::bigint))
    ORDER BY t.dag_id, t.dag_job, ti.input_index, ti.producer_task_id, ti.event_key,
             t.created_at DESC
)
SELECT dep.task_id::text AS rerun_of, dep.producer_task_id::text AS producer_task_id,
       dep.event_key, dep.event_seq, e.event_type, e.payload::text AS event_payload,
       trace_event_output(e.payload) AS output,
       dep.org_id::text AS org_id, dep.dag_id::text AS dag_id, g.name AS dag,
       g.active_version AS version, dep.dag_job AS job, dep.input_index,
       j.operator, j.runtime, j.config::text AS config, j.timeout_s, j.max_attempts,
       (j.job IS NOT NULL AND i.job IS NOT NULL) AS in_active,
       EXISTS (SELECT 1 FROM dag_rematerializations m
               WHERE m.dag_id = dep.dag_id AND m.state = 'building'
                 AND dep.dag_job = ANY(m.rebuild)) AS rebuilding
FROM dep
JOIN task_events e ON e.task_id = dep.producer_task_id AND e.event_key = dep.event_key
JOIN dags g ON g.dag_id = dep.dag_id
LEFT JOIN dag_jobs j ON (j.dag_id, j.version, j.job) = (g.dag_id, g.active_version, dep.dag_job)
LEFT JOIN dag_inputs i ON (i.dag_id, i.version, i.job, i.input_index)
                        = (g.dag_id, g.active_version, dep.dag_job, dep.input_index)
ORDER BY dep.event_seq, g.name, dep.dag_job, dep.input_index;

-- name: claim_invalidations
-- Lock invalidations announced by replace commits (outputs.INVALIDATE_TOPIC) for one pass.
SELECT id, tries, payload::text AS payload FROM outbox
WHERE topic = %(topic)s AND state = 'pending' AND available_at <= now()
ORDER BY available_at, id
LIMIT %(batch)s
FOR UPDATE SKIP LOCKED;

-- name: mark_consumed
-- Record consumed invalidations as the kernel decided (decide_sent), in the pass's transaction.
UPDATE outbox o
SET state = c.state, tries = c.tries, published_at = now()
FROM unnest(%(ids)s::bigint[], %(states)s::text[], %(tries)s::int[]) AS c(id, state, tries)
WHERE o.id = c.id AND o.state = 'pending';

-- name: deployers_of_dataset
-- The deployers of the DAG producing a dataset (who may invalidate it, with org admins and
-- dag_deployer members: trace_core.access.check_deploy).
SELECT m.subject FROM datasets d
JOIN dag_members m ON m.dag_id = d.dag_id AND m.relation = 'deployer'
WHERE d.dataset_uuid = %(uuid)s;
