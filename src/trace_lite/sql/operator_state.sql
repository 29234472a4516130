-- Durable operator state (trace_lite.operator_state). The key is derived from the task row,
-- never taken from the operator: its org, its job, and an input dataset named in its org.

-- name: state_scope
-- The state key of a task, with whether the given attempt is the task's running one.
SELECT t.org_id::text AS org_id,
       coalesce(t.dag_id::text || '/' || t.dag_job, t.job_id::text,
                'key/' || (t.payload ->> 'state_key')) AS job_key,
       coalesce((SELECT d.dataset_uuid::text FROM datasets d
                 WHERE d.org_id = t.org_id AND d.name = %(input_dataset)s),
                CASE WHEN %(input_dataset)s::text IS NULL
                     THEN '00000000-0000-0000-0000-000000000000' END) AS input_dataset_uuid,
       (t.state = 'running' AND t.attempt = %(attempt)s) AS running
FROM tasks t
WHERE t.task_id = %(task_id)s;

-- name: state_get
-- The stored state document and its version.
SELECT state::text AS state, version
FROM operator_state
WHERE org_id = %(org_id)s AND job_key = %(job_key)s
  AND input_dataset_uuid = %(input_dataset_uuid)s;

-- name: state_insert
-- The first version of a state; nothing when another writer created it first.
INSERT INTO operator_state (org_id, job_key, input_dataset_uuid, state, version,
                            updated_by_task)
VALUES (%(org_id)s, %(job_key)s, %(input_dataset_uuid)s, %(state)s, 1, %(task_id)s)
ON CONFLICT DO NOTHING
RETURNING version;

-- name: state_update
-- The next version of a state, only over the version the writer read.
UPDATE operator_state
SET state = %(state)s, version = version + 1, updated_by_task = %(task_id)s,
    updated_at = now()
WHERE org_id = %(org_id)s AND job_key = %(job_key)s
  AND input_dataset_uuid = %(input_dataset_uuid)s AND version = %(version)s
RETURNING version;

-- name: writer_state
-- The lifecycle state of another task of the same org and job (the state's last writer).
SELECT w.state
FROM tasks t
JOIN tasks w ON w.task_id = %(writer_task_id)s AND w.org_id = t.org_id
 AND coalesce(w.dag_id::text || '/' || w.dag_job, w.job_id::text,
              'key/' || (w.payload ->> 'state_key'))
   = coalesce(t.dag_id::text || '/' || t.dag_job, t.job_id::text,
              'key/' || (t.payload ->> 'state_key'))
WHERE t.task_id = %(task_id)s;
