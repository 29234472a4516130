-- Chain ingest operators in Lite (trace_lite.chain.operators).

-- name: reader_task
-- A task's org, its read grants, and whether the given attempt is its running one.
SELECT t.org_id::text AS org_id, o.name AS org_name,
       t.read_datasets,
       (t.state = 'running' AND t.attempt = %(attempt)s) AS running
FROM tasks t JOIN orgs o ON o.org_id = t.org_id
WHERE t.task_id = %(task_id)s;
