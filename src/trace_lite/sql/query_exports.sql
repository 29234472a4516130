-- Batch exports of the Query Service (trace_lite.query.exports). Every ending is a
-- compare-and-swap from 'running': an export ends once, and a canceled one never succeeds.

-- name: export_insert
-- A new running export.
INSERT INTO query_exports (export_id, org_id, requested_by, sql, format, max_rows,
                           deadline_at, expires_at)
VALUES (%(export_id)s, %(org_id)s, %(requested_by)s, %(sql)s, %(format)s, %(max_rows)s,
        now() + make_interval(secs => %(deadline_s)s),
        now() + make_interval(secs => %(retention_s)s));

-- name: export_get
-- One export, with whether a running one is past its deadline.
SELECT export_id::text AS export_id, org_id::text AS org_id, requested_by, format, state,
       max_rows, rows, bytes, truncated, object_key, versions, error, created_at, finished_at,
       expires_at, (state = 'running' AND deadline_at < now()) AS abandoned
FROM query_exports
WHERE export_id = %(export_id)s;

-- name: export_state
-- The state of one export (the runner polls it to see a cancellation from any server).
SELECT state FROM query_exports WHERE export_id = %(export_id)s;

-- name: export_succeed
-- A running export's result is stored.
UPDATE query_exports
SET state = 'succeeded', rows = %(rows)s, bytes = %(bytes)s, truncated = %(truncated)s,
    object_key = %(object_key)s, versions = %(versions)s, finished_at = now()
WHERE export_id = %(export_id)s AND state = 'running'
RETURNING state;

-- name: export_fail
-- A running export failed (or was abandoned by its server).
UPDATE query_exports
SET state = 'failed', error = %(error)s, finished_at = now()
WHERE export_id = %(export_id)s AND state = 'running'
RETURNING state;

-- name: export_cancel
-- A running export is canceled.
UPDATE query_exports
SET state = 'canceled', finished_at = now()
WHERE export_id = %(export_id)s AND state = 'running'
RETURNING state;

-- name: export_expired
-- Finished exports past their retention, oldest first.
SELECT export_id::text AS export_id, object_key
FROM query_exports
WHERE expires_at < now() AND state <> 'running'
ORDER BY expires_at
LIMIT %(limit)s;

-- name: export_delete
-- Forget an expired export (its object already deleted).
DELETE FROM query_exports WHERE export_id = %(export_id)s;
