-- Promotion and staging cleanup (trace_lite.dataset_gc): committed partitions are verified and
-- copied to their canonical keys; finished attempts' staging prefixes are swept after a grace.

-- name: unpromoted
-- Committed partitions whose object still lives in the staging prefix.
SELECT partition_id, dataset_version::text AS dataset_version, task_id::text AS task_id,
       attempt, object_key, staged_key, size, sha256
FROM dataset_partitions
WHERE state = 'committed' ORDER BY partition_id LIMIT %(n)s;

-- name: mark_promoted
-- Verified and copied: readers now read the canonical key (CAS on the committed state).
UPDATE dataset_partitions SET state = 'promoted'
WHERE partition_id = ANY(%(ids)s::bigint[]) AND state = 'committed';

-- name: mark_corrupt
-- The staged bytes no longer match what was committed: never readable, never retried.
-- Returns the partitions this call marked (a concurrent promoter's are not returned twice).
UPDATE dataset_partitions SET state = 'corrupt'
WHERE partition_id = ANY(%(ids)s::bigint[]) AND state = 'committed'
RETURNING partition_id;

-- name: partition_counts
-- Partitions by state (`corrupt` is an alarm).
SELECT state, count(*) AS n FROM dataset_partitions GROUP BY state;

-- name: unswept_attempts
-- Finished attempts older than the grace period whose staging prefix was not cleaned yet.
SELECT a.task_id::text AS task_id, a.attempt, t.org_id::text AS org_id
FROM task_attempts a JOIN tasks t ON t.task_id = a.task_id
WHERE a.outcome <> 'running' AND a.finished_at < now() - make_interval(secs => %(grace_s)s)
  AND NOT EXISTS (SELECT 1 FROM staging_sweeps s
                  WHERE s.task_id = a.task_id AND s.attempt = a.attempt)
ORDER BY a.finished_at
LIMIT %(n)s;

-- name: unpromoted_of_attempt
-- Whether an attempt has committed partitions that promotion has not copied yet.
SELECT EXISTS (SELECT 1 FROM dataset_partitions
               WHERE task_id = %(task_id)s AND attempt = %(attempt)s
                 AND state = 'committed') AS waiting;

-- name: record_sweep
-- Remember that an attempt's staging prefix was cleaned.
INSERT INTO staging_sweeps (task_id, attempt, deleted) VALUES (%(task_id)s, %(attempt)s, %(deleted)s)
ON CONFLICT DO NOTHING;
