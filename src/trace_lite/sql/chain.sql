-- Chain ingest operators in Lite (trace_lite.chain.operators).

-- name: reader_task
-- A task's org, its read grants, and whether the given attempt is its running one.
SELECT t.org_id::text AS org_id, o.name AS org_name,
       t.read_datasets,
       (t.state = 'running' AND t.attempt = %(attempt)s) AS running
FROM tasks t JOIN orgs o ON o.org_id = t.org_id
WHERE t.task_id = %(task_id)s;

-- name: dag_progress
-- Task counts of one DAG's jobs for progress displays (trace_lite.chain.progress): ranges
-- ingested (and how many blocks, and how many came from input `backfill_input`), transfers
-- decoded, work not finished outside the `background` jobs, failures and retries.
SELECT
  count(*) FILTER (WHERE t.dag_job = %(ingest)s) AS ranges,
  count(*) FILTER (WHERE t.dag_job = %(ingest)s AND t.state = 'completed') AS ranges_done,
  coalesce(sum((t.result ->> 'end')::bigint - (t.result ->> 'start')::bigint)
           FILTER (WHERE t.dag_job = %(ingest)s AND t.state = 'completed'), 0)::bigint
    AS blocks_done,
  count(*) FILTER (WHERE t.dag_job = %(ingest)s AND t.state = 'completed'
                   AND (t.payload -> 'event' ->> 'input')::int = %(backfill_input)s)
    AS backfill_done,
  count(*) FILTER (WHERE t.dag_job = %(transfers)s AND t.state = 'completed') AS decoded_ranges,
  coalesce(sum((t.result ->> 'transfers')::bigint)
           FILTER (WHERE t.dag_job = %(transfers)s AND t.state = 'completed'), 0)::bigint
    AS transfers,
  count(*) FILTER (WHERE t.state NOT IN ('completed', 'failed', 'canceled')
                   AND NOT t.dag_job = ANY(%(background)s)) AS in_flight,
  count(*) FILTER (WHERE t.state = 'failed') AS failed,
  count(*) FILTER (WHERE t.attempt > 1) AS retried,
  count(*) AS tasks,
  NULL::bigint AS cursor  -- filled from dag_job_state
FROM tasks t
JOIN dags g ON g.dag_id = t.dag_id
JOIN orgs o ON o.org_id = g.org_id
WHERE o.name = %(org)s AND g.name = %(dag)s;

-- name: dag_job_state
-- The operator state of one job of a DAG (the follower's cursor), if any.
SELECT s.state::text AS state
FROM operator_state s
JOIN dags g ON s.job_key = g.dag_id::text || '/' || %(job)s AND s.org_id = g.org_id
JOIN orgs o ON o.org_id = g.org_id
WHERE o.name = %(org)s AND g.name = %(dag)s;

-- name: committed_blocks
-- The live partitions inside [low, high) of dataset `dataset` in the active version of the
-- task's own DAG, each with the digest of its block hashes that the extract which committed
-- it recorded in its blocks range event (NULL: none recorded).
SELECT p.partition_id, p.range_start AS start, p.range_end AS "end",
       e.payload ->> 'hashes_sha256' AS hashes_sha256
FROM tasks me
JOIN datasets d ON d.org_id = me.org_id AND d.dag_id = me.dag_id AND d.name = %(dataset)s
JOIN dags g ON g.dag_id = d.dag_id
JOIN dag_pointers ptr ON ptr.dag_id = g.dag_id AND ptr.generation = g.active_generation
                     AND ptr.dataset_uuid = d.dataset_uuid
JOIN dataset_partitions p ON p.dataset_version = ptr.dataset_version
LEFT JOIN task_events e ON e.task_id = p.task_id
                       AND e.event_key = 'range:blocks:' || p.range_start || '_' || p.range_end
WHERE me.task_id = %(task_id)s
  AND p.superseded_at IS NULL AND p.range_start >= %(low)s AND p.range_end <= %(high)s
ORDER BY p.range_start;
