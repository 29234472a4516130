-- The output commit (trace_lite.outputs): a completion's manifest becomes partitions, in the
-- completion's transaction. The kernel (trace_core.commit) plans; these statements read and
-- apply. Also the write guard's question (trace_lite.write_guard).

-- name: task_orgs
-- The org of each task (to build staging prefixes before the completion transaction) and the
-- DAG it runs for (NULL: an admin-API task), which limits the datasets it may commit to, and
-- the staged pointer set it commits through when its version is a building staging
-- (trace_lite.dag_remat).
SELECT t.task_id::text AS task_id, t.org_id::text AS org_id, t.dag_id::text AS dag_id,
       m.generation AS staged_generation
FROM tasks t
LEFT JOIN dag_rematerializations m ON m.dag_id = t.dag_id AND m.version = t.dag_version
                                  AND m.state = 'building'
WHERE t.task_id = ANY(%(task_ids)s::uuid[]);

-- name: commit_targets
-- Resolve manifest dataset names in an org to their target versions (explicit, or the pointer
-- of the DAG's active set -- its staged set for a staged task of that DAG) and their producing
-- DAG; locks the versions FOR SHARE so a purge cannot run under a commit.
WITH c AS (
    SELECT * FROM unnest(%(names)s::text[], %(versions)s::uuid[]) AS c(name, version)
), t AS (
    SELECT c.name, c.version AS asked, d.dataset_uuid, d.dag_id, d.update_strategy,
           coalesce(c.version, p.dataset_version) AS dataset_version
    FROM c
    JOIN datasets d ON d.org_id = %(org_id)s AND d.name = c.name
    JOIN dags g ON g.dag_id = d.dag_id
    LEFT JOIN dag_pointers p
           ON p.dag_id = g.dag_id AND p.dataset_uuid = d.dataset_uuid
          AND p.generation = CASE WHEN g.dag_id = %(dag_id)s::uuid
                                  THEN coalesce(%(staged_generation)s::bigint, g.active_generation)
                                  ELSE g.active_generation END
)
SELECT t.name, t.asked::text AS asked, t.dataset_uuid::text AS dataset_uuid,
       t.dag_id::text AS producer_dag_id, t.update_strategy,
       t.dataset_version::text AS dataset_version, v.state AS version_state
FROM t JOIN dataset_versions v
  ON v.dataset_version = t.dataset_version AND v.dataset_uuid = t.dataset_uuid
ORDER BY v.dataset_version
FOR SHARE OF v;

-- name: live_partitions
-- Live partitions of versions that a manifest's ranges or keys touch.
SELECT partition_id, dataset_version::text AS dataset_version, range_start AS start,
       range_end AS "end", partition_key AS key
FROM dataset_partitions
WHERE dataset_version = ANY(%(versions)s::uuid[]) AND superseded_at IS NULL
  AND ((range_start IS NOT NULL AND range_start < %(max_end)s AND range_end > %(min_start)s)
       OR partition_key = ANY(%(keys)s::text[]));

-- name: supersede_partitions
-- Mark partitions superseded by a replace.
UPDATE dataset_partitions SET superseded_at = now()
WHERE partition_id = ANY(%(ids)s::bigint[]) AND superseded_at IS NULL;

-- name: insert_partitions
-- Record committed partitions (the manifest's entries after the plan), state 'committed'.
INSERT INTO dataset_partitions (dataset_version, range_start, range_end, partition_key,
                                object_key, staged_key, size, sha256, task_id, attempt)
SELECT c.v, c.s, c.e, c.k, c.ok, c.sk, c.sz, c.sh, %(task_id)s, %(attempt)s
FROM unnest(%(versions)s::uuid[], %(starts)s::bigint[], %(ends)s::bigint[], %(keys)s::text[],
            %(object_keys)s::text[], %(staged_keys)s::text[], %(sizes)s::bigint[],
            %(shas)s::text[]) AS c(v, s, e, k, ok, sk, sz, sh);

-- name: notify_committed
-- Wake the promotion pass (delivered when the completion commits; see trace_lite.dataset_gc).
SELECT pg_notify('trace_dataset_partitions', '');

-- name: insert_outbox_many
-- Outbox rows (invalidations), in the caller's transaction.
INSERT INTO outbox (topic, payload)
SELECT %(topic)s, p FROM unnest(%(payloads)s::jsonb[]) AS p;

-- name: staged_key_writable
-- Whether a signed PUT may still write a key of an attempt's staging prefix: the attempt is
-- running in that org (its completion, which commits outputs, has not happened) and no buffer
-- batch or partition records the key as committed.
SELECT EXISTS (SELECT 1 FROM task_attempts a JOIN tasks t ON t.task_id = a.task_id
               WHERE a.task_id = %(task_id)s AND a.attempt = %(attempt)s
                 AND a.outcome = 'running' AND t.org_id = %(org_id)s)
       AND NOT EXISTS (SELECT 1 FROM buffer_batches b
                       WHERE b.task_id = %(task_id)s AND b.object_key = %(key)s)
       AND NOT EXISTS (SELECT 1 FROM dataset_partitions p
                       WHERE p.task_id = %(task_id)s AND p.attempt = %(attempt)s
                         AND p.staged_key = %(key)s) AS writable;
