-- Controlling deployed DAGs (trace_lite.dag_control): roll a DAG back to its previous version
-- and pointer set, cancel a run or a version's tasks, report a DAG's task counts. The kernel
-- (trace_core.access, trace_core.lifecycle) decides; these statements read and apply.
-- Migration 0014 holds dag_activations.

-- name: lock_dag
-- A DAG of an org with its active version and pointer set, locked: rollbacks, deploys, cutovers
-- and task creation for the DAG serialize on this row.
SELECT dag_id::text AS dag_id, active_version, active_generation FROM dags
WHERE org_id = %(org_id)s AND name = %(name)s FOR UPDATE;

-- name: dag
-- A DAG of an org with its active version and pointer set (no lock).
SELECT dag_id::text AS dag_id, active_version, active_generation FROM dags
WHERE org_id = %(org_id)s AND name = %(name)s;

-- name: deployers
-- The subjects that deploy a DAG (dag_members relation 'deployer').
SELECT subject FROM dag_members WHERE dag_id = %(dag_id)s AND relation = 'deployer';

-- name: current_activation
-- The latest activation of a DAG (what is live).
SELECT seq, version, generation, previous_seq FROM dag_activations
WHERE dag_id = %(dag_id)s ORDER BY seq DESC LIMIT 1;

-- name: activation
-- One activation of a DAG, with whether its pointer set names a purged dataset version.
SELECT a.seq, a.version, a.generation, a.previous_seq,
       EXISTS (SELECT 1 FROM dag_pointers p JOIN dataset_versions v USING (dataset_version)
               WHERE p.dag_id = a.dag_id AND p.generation = a.generation
                 AND v.state = 'purged') AS names_purged
FROM dag_activations a WHERE a.dag_id = %(dag_id)s AND a.seq = %(seq)s;

-- name: restore
-- Make a version and its pointer set active again (compare-and-swap on the active pair).
UPDATE dags SET active_version = %(version)s, active_generation = %(generation)s
WHERE dag_id = %(dag_id)s AND active_version = %(expected_version)s
  AND active_generation IS NOT DISTINCT FROM %(expected_generation)s
RETURNING active_version;

-- name: record_rollback
-- Record a rollback's activation; it steps back to what the restored activation stepped back to.
INSERT INTO dag_activations (dag_id, seq, version, generation, previous_seq, reason, created_by)
SELECT %(dag_id)s, coalesce(max(seq), 0) + 1, %(version)s, %(generation)s, %(previous_seq)s,
       'rollback', %(created_by)s
FROM dag_activations WHERE dag_id = %(dag_id)s
RETURNING seq;

-- name: cancel_version_tasks
-- Cancel every task of a DAG version in a state the kernel may cancel (lifecycle.TRANSITIONS);
-- answers the state each canceled task was in. Running attempts learn it at their next
-- heartbeat or completion, as for a single cancel.
WITH c AS (
    SELECT task_id, state FROM tasks
    WHERE dag_id = %(dag_id)s AND dag_version = %(version)s AND state = ANY(%(states)s::text[])
    FOR UPDATE
)
UPDATE tasks t SET state = 'canceled', finished_at = now(), updated_at = now()
FROM c WHERE t.task_id = c.task_id AND t.state = c.state
RETURNING c.state AS was;

-- name: run_tasks
-- The tasks of a DAG run: the source task the run id names ({dag}:{job}:{run_id}, a manual run
-- or a schedule slot) and every task of the same DAG created, transitively, from its events.
WITH RECURSIVE run AS (
    SELECT t.task_id FROM tasks t JOIN dags g ON g.dag_id = t.dag_id
    WHERE t.dag_id = %(dag_id)s AND t.idempotency_key = g.name || ':' || t.dag_job || ':' || %(run_id)s
    UNION
    SELECT i.task_id FROM task_inputs i JOIN run r ON i.producer_task_id = r.task_id
    JOIN tasks t ON t.task_id = i.task_id AND t.dag_id = %(dag_id)s
)
SELECT task_id::text AS task_id FROM run;

-- name: cancel_tasks
-- Cancel the given tasks that are in a state the kernel may cancel; answers the state each
-- canceled task was in.
WITH c AS (
    SELECT task_id, state FROM tasks
    WHERE task_id = ANY(%(task_ids)s::uuid[]) AND state = ANY(%(states)s::text[])
    FOR UPDATE
)
UPDATE tasks t SET state = 'canceled', finished_at = now(), updated_at = now()
FROM c WHERE t.task_id = c.task_id AND t.state = c.state
RETURNING c.state AS was;

-- name: version_exists
-- Whether a DAG has a version.
SELECT version FROM dag_versions WHERE dag_id = %(dag_id)s AND version = %(version)s;

-- name: job_counts
-- The tasks of each job of a DAG version by state (a job without tasks: one row, state NULL).
SELECT j.job, t.state, count(t.task_id) AS n
FROM dag_jobs j
LEFT JOIN tasks t ON t.dag_id = j.dag_id AND t.dag_version = j.version AND t.dag_job = j.job
WHERE j.dag_id = %(dag_id)s AND j.version = %(version)s
GROUP BY j.job, t.state
ORDER BY j.job, t.state;

-- name: unfinished_by_version
-- Tasks of a DAG's other versions that are not finished yet (not in a terminal state), by
-- version and state.
SELECT dag_version AS version, state, count(*) AS n FROM tasks
WHERE dag_id = %(dag_id)s AND dag_version <> %(version)s
  AND state <> ALL(%(terminal)s::text[])
GROUP BY dag_version, state
ORDER BY dag_version, state;
