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

-- name: recent_events
-- The newest alert events of a version's table (data DB; trace alerts ls).
SELECT alert_key, detector, event_time, severity, summary, labels FROM {table}
ORDER BY event_time DESC, alert_key
LIMIT %(limit)s;

-- name: delivery_states
-- Deliveries per alert key and state (trace alerts ls).
SELECT alert_key, state, count(*)::int AS n FROM alert_deliveries
WHERE org_id = %(org_id)s AND alert_key = ANY(%(keys)s)
GROUP BY alert_key, state;

-- name: table_exists
-- Whether a version's table exists yet (data DB).
SELECT to_regclass(%(name)s) IS NOT NULL AS found;
