-- Worker-pool slots (trace_lite.pool_slots): the pool a task's DAG job uses, and the slot
-- leases of a pool. Migration 0015 holds the table.

-- name: pooled_tasks
-- Of these tasks, those whose DAG job names a worker_pool in its version's spec: the pool's
-- slots (as the spec stores them: [{env?, secret_env?}]) and the job's max_concurrency.
SELECT t.task_id::text AS task_id, t.dag_id::text AS dag_id, t.dag_job,
       v.spec -> 'jobs' -> t.dag_job ->> 'worker_pool' AS pool,
       (v.spec -> 'worker_pools' -> (v.spec -> 'jobs' -> t.dag_job ->> 'worker_pool'))::text
           AS slots,
       (v.spec -> 'jobs' -> t.dag_job -> 'scaling' ->> 'max_concurrency')::int AS max_concurrency
FROM tasks t
JOIN dag_versions v ON v.dag_id = t.dag_id AND v.version = t.dag_version
WHERE t.task_id = ANY(%(task_ids)s::uuid[]) AND t.dag_id IS NOT NULL
  AND v.spec -> 'jobs' -> t.dag_job ? 'worker_pool';

-- name: lock_pool
-- Serialize the claims of one pool (until the claim's transaction ends).
SELECT pg_advisory_xact_lock(hashtextextended('trace.pool/' || %(dag_id)s || '/' || %(pool)s, 0));

-- name: held_slots
-- The slots of a pool held by a running attempt, with the job of the holder.
SELECT l.slot, l.dag_job
FROM pool_slot_leases l
JOIN task_attempts a ON a.task_id = l.task_id AND a.attempt = l.attempt AND a.outcome = 'running'
WHERE l.dag_id = %(dag_id)s AND l.pool = %(pool)s;

-- name: lease_slot
-- Take a free slot for an attempt (overwriting the row of an ended attempt).
INSERT INTO pool_slot_leases (dag_id, pool, slot, dag_job, task_id, attempt)
VALUES (%(dag_id)s, %(pool)s, %(slot)s, %(dag_job)s, %(task_id)s, %(attempt)s)
ON CONFLICT (dag_id, pool, slot) DO UPDATE
SET dag_job = EXCLUDED.dag_job, task_id = EXCLUDED.task_id, attempt = EXCLUDED.attempt;

-- name: slot_of_attempt
-- The slot an attempt leased, with the slot's definition from the task's version.
SELECT l.pool, l.slot AS index,
       (v.spec -> 'worker_pools' -> l.pool -> l.slot)::text AS definition
FROM pool_slot_leases l
JOIN tasks t ON t.task_id = l.task_id
JOIN dag_versions v ON v.dag_id = t.dag_id AND v.version = t.dag_version
WHERE l.task_id = %(task_id)s AND l.attempt = %(attempt)s;
