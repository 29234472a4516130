-- The rows an alert operator's input event announces (trace_lite.alert_inputs).

-- name: input_scope
-- The consuming task's org, whether the attempt is its running one, and the dataset version
-- the event names if that dataset is a buffered dataset of the task's org.
SELECT t.org_id::text AS org_id,
       (t.state = 'running' AND t.attempt = %(attempt)s) AS running,
       d.name AS dataset,
       v.dataset_version::text AS dataset_version
FROM tasks t
LEFT JOIN datasets d
       ON d.org_id = t.org_id AND d.dataset_uuid = %(dataset_uuid)s
      AND d.storage_kind = 'buffered_postgres'
LEFT JOIN dataset_versions v
       ON v.dataset_uuid = d.dataset_uuid AND v.dataset_version = %(dataset_version)s
      AND v.state = 'open'
WHERE t.task_id = %(task_id)s;

-- name: batch_rows
-- The rows one buffer batch of one producer task stored in a version's table (data DB).
SELECT * FROM {table}
WHERE _task_id = %(task_id)s AND _batch_key = %(batch_key)s
ORDER BY _dedupe_key;
