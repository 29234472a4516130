-- Dataset registry, versions, pointer sets, partitions, pins and membership. The kernel
-- (trace_core.commit, trace_core.access) decides; these statements read and apply.

-- name: org_by_name
-- An org's id by name.
SELECT org_id::text FROM orgs WHERE name = %(name)s;

-- name: task_org
-- The org of a task, from its row (a task resolves in that org, whatever its token says).
SELECT t.org_id::text AS org_id, o.name AS org_name
FROM tasks t JOIN orgs o ON o.org_id = t.org_id
WHERE t.task_id = %(task_id)s;

-- name: ensure_org
-- Create the org if missing; return its id.
INSERT INTO orgs (org_id, name) VALUES (gen_random_uuid(), %(name)s)
ON CONFLICT (name) DO UPDATE SET name = EXCLUDED.name
RETURNING org_id::text;

-- name: member
-- A subject's roles in an org, and the DAGs of that org it deploys or triggers.
SELECT coalesce((SELECT roles FROM org_members WHERE org_id = %(org_id)s AND subject = %(subject)s),
                '{}'::text[]),
       coalesce((SELECT array_agg(DISTINCT m.dag_id::text) FROM dag_members m
                 JOIN dags g ON g.dag_id = m.dag_id
                 WHERE g.org_id = %(org_id)s AND m.subject = %(subject)s), '{}'::text[]),
       EXISTS (SELECT 1 FROM org_members WHERE org_id = %(org_id)s AND subject = %(subject)s);

-- name: upsert_member
-- Set a member's roles.
INSERT INTO org_members (org_id, subject, roles) VALUES (%(org_id)s, %(subject)s, %(roles)s)
ON CONFLICT (org_id, subject) DO UPDATE SET roles = EXCLUDED.roles
RETURNING subject, roles;

-- name: delete_member
-- Remove a member (and their DAG memberships in the org).
WITH d AS (
    DELETE FROM dag_members m USING dags g
    WHERE m.dag_id = g.dag_id AND g.org_id = %(org_id)s AND m.subject = %(subject)s
)
DELETE FROM org_members WHERE org_id = %(org_id)s AND subject = %(subject)s RETURNING subject;

-- name: list_members
-- An org's members.
SELECT subject, roles FROM org_members WHERE org_id = %(org_id)s ORDER BY subject;

-- name: ensure_dag
-- Create a DAG if missing; return its id.
INSERT INTO dags (dag_id, org_id, name) VALUES (gen_random_uuid(), %(org_id)s, %(name)s)
ON CONFLICT (org_id, name) DO UPDATE SET name = EXCLUDED.name
RETURNING dag_id::text;

-- name: dag_by_name
-- A DAG of an org, locked for a pointer-set change.
SELECT dag_id::text, active_generation FROM dags
WHERE org_id = %(org_id)s AND name = %(name)s FOR UPDATE;

-- name: add_dag_member
-- Make a subject a deployer or triggerer of a DAG.
INSERT INTO dag_members (dag_id, subject, relation) VALUES (%(dag_id)s, %(subject)s, %(relation)s)
ON CONFLICT DO NOTHING;

-- name: insert_dataset
-- Register a dataset; the name is unique per org.
INSERT INTO datasets (dataset_uuid, org_id, name, dag_id, job_name, output_index, storage_kind,
                      schema, update_strategy, unique_key, read_roles)
VALUES (gen_random_uuid(), %(org_id)s, %(name)s, %(dag_id)s, %(job_name)s, %(output_index)s,
        %(storage_kind)s, %(schema)s, %(update_strategy)s, %(unique_key)s, %(read_roles)s)
RETURNING dataset_uuid::text;

-- name: dataset_by_name
-- One dataset of an org with its ACL fields.
SELECT d.dataset_uuid::text, d.name, d.dag_id::text, d.read_roles, d.storage_kind,
       d.update_strategy, d.unique_key, d.job_name, d.output_index, d.schema, g.name, d.created_at
FROM datasets d JOIN dags g ON g.dag_id = d.dag_id
WHERE d.org_id = %(org_id)s AND d.name = %(name)s;

-- name: list_datasets
-- Every dataset of an org with its active version.
SELECT d.dataset_uuid::text, d.name, d.dag_id::text, d.read_roles, d.storage_kind,
       d.update_strategy, g.name, p.dataset_version::text
FROM datasets d
JOIN dags g ON g.dag_id = d.dag_id
LEFT JOIN dag_pointers p ON p.dag_id = g.dag_id AND p.generation = g.active_generation
                        AND p.dataset_uuid = d.dataset_uuid
WHERE d.org_id = %(org_id)s
ORDER BY d.name;

-- name: set_read_roles
-- Replace a dataset's read_roles.
UPDATE datasets SET read_roles = %(read_roles)s
WHERE dataset_uuid = %(dataset_uuid)s RETURNING read_roles;

-- name: insert_version
-- Open a new (empty) version of a dataset.
INSERT INTO dataset_versions (dataset_version, dataset_uuid)
VALUES (gen_random_uuid(), %(dataset_uuid)s)
RETURNING dataset_version::text;

-- name: dataset_versions
-- A dataset's versions with partition counts, whether active, and live pins.
SELECT v.dataset_version::text, v.state, v.created_at, v.purged_at,
       (SELECT count(*) FROM dataset_partitions p
        WHERE p.dataset_version = v.dataset_version AND p.superseded_at IS NULL),
       EXISTS (SELECT 1 FROM datasets d JOIN dags g ON g.dag_id = d.dag_id
               JOIN dag_pointers pt ON pt.dag_id = g.dag_id AND pt.generation = g.active_generation
               WHERE d.dataset_uuid = v.dataset_uuid AND pt.dataset_version = v.dataset_version),
       (SELECT count(*) FROM dataset_pins n
        WHERE n.dataset_version = v.dataset_version AND n.expires_at > now())
FROM dataset_versions v WHERE v.dataset_uuid = %(dataset_uuid)s
ORDER BY v.created_at, v.dataset_version;

-- name: dag_pointer_history
-- A DAG's pointer sets (newest first) with their pointers.
SELECT s.generation, s.parent_generation, s.created_by, s.created_at,
       s.generation = g.active_generation,
       coalesce(jsonb_object_agg(d.name, p.dataset_version::text)
                FILTER (WHERE d.name IS NOT NULL), '{}'::jsonb)
FROM dag_pointer_sets s
JOIN dags g ON g.dag_id = s.dag_id
LEFT JOIN dag_pointers p ON p.dag_id = s.dag_id AND p.generation = s.generation
LEFT JOIN datasets d ON d.dataset_uuid = p.dataset_uuid
WHERE s.dag_id = %(dag_id)s
GROUP BY s.generation, s.parent_generation, s.created_by, s.created_at, g.active_generation
ORDER BY s.generation DESC
LIMIT %(n)s;

-- name: dag_datasets_versions
-- The datasets a DAG produces, by name, with the state of a named version of each.
SELECT d.name, d.dataset_uuid::text, v.dataset_version::text, v.state
FROM datasets d
JOIN unnest(%(names)s::text[], %(versions)s::uuid[]) AS c(name, version) ON c.name = d.name
LEFT JOIN dataset_versions v ON v.dataset_version = c.version AND v.dataset_uuid = d.dataset_uuid
WHERE d.dag_id = %(dag_id)s;

-- name: insert_pointer_set
-- Cut over: a new generation = the active set overlaid with the new pointers; then activate it
-- (CAS on the active generation). One statement, one transaction.
WITH s AS (
    INSERT INTO dag_pointer_sets (dag_id, generation, parent_generation, created_by)
    SELECT %(dag_id)s, coalesce(max(generation), 0) + 1, %(expected)s, %(created_by)s
    FROM dag_pointer_sets WHERE dag_id = %(dag_id)s
    RETURNING generation
), ptr AS (
    INSERT INTO dag_pointers (dag_id, generation, dataset_uuid, dataset_version)
    SELECT %(dag_id)s, s.generation, x.dataset_uuid, x.dataset_version
    FROM s, (
        SELECT c.dataset_uuid, c.dataset_version
        FROM unnest(%(dataset_uuids)s::uuid[], %(versions)s::uuid[]) AS c(dataset_uuid, dataset_version)
        UNION ALL
        SELECT p.dataset_uuid, p.dataset_version FROM dag_pointers p
        WHERE p.dag_id = %(dag_id)s AND p.generation = %(expected)s
          AND p.dataset_uuid <> ALL(%(dataset_uuids)s::uuid[])
    ) x
)
UPDATE dags SET active_generation = s.generation
FROM s
WHERE dag_id = %(dag_id)s AND active_generation IS NOT DISTINCT FROM %(expected)s
RETURNING s.generation;

-- name: pointer_set_parent
-- The parent of a generation and whether any of its pointers names a purged version.
SELECT s.parent_generation,
       EXISTS (SELECT 1 FROM dag_pointers p JOIN dataset_versions v USING (dataset_version)
               WHERE p.dag_id = s.dag_id AND p.generation = s.parent_generation
                 AND v.state = 'purged')
FROM dag_pointer_sets s WHERE s.dag_id = %(dag_id)s AND s.generation = %(generation)s;

-- name: activate_generation
-- Roll back: move the active pointer to another generation (CAS on the active generation).
UPDATE dags SET active_generation = %(generation)s
WHERE dag_id = %(dag_id)s AND active_generation IS NOT DISTINCT FROM %(expected)s
RETURNING active_generation;

-- name: resolve
-- Pin each named dataset to its active version: read the active pointer sets and write pin
-- rows in ONE statement (one snapshot: a whole set, never a mix), then lock the pinned versions
-- FOR SHARE so a concurrent purge either waits for this pin or is seen (state = purged).
WITH r AS (
    SELECT d.name, d.dataset_uuid, d.dag_id, d.read_roles, d.storage_kind, p.dataset_version
    FROM datasets d
    JOIN dags g ON g.dag_id = d.dag_id
    LEFT JOIN dag_pointers p ON p.dag_id = g.dag_id AND p.generation = g.active_generation
                            AND p.dataset_uuid = d.dataset_uuid
    WHERE d.org_id = %(org_id)s AND d.name = ANY(%(names)s::text[])
), pin AS (
    INSERT INTO dataset_pins (pin_id, dataset_version, subject, expires_at)
    SELECT %(pin_id)s, r.dataset_version, %(subject)s,
           now() + make_interval(secs => %(ttl_s)s)
    FROM r WHERE r.dataset_version IS NOT NULL AND %(ttl_s)s > 0
    ON CONFLICT DO NOTHING
), lock AS (
    SELECT v.dataset_version, v.state FROM dataset_versions v
    WHERE v.dataset_version IN (SELECT dataset_version FROM r)
    FOR SHARE
)
SELECT r.name, r.dataset_uuid::text, r.dag_id::text, r.read_roles, r.storage_kind,
       r.dataset_version::text, lock.state
FROM r LEFT JOIN lock ON lock.dataset_version = r.dataset_version;

-- name: version_objects
-- The live partitions of versions with their state; readers are handed the promoted ones only
-- (their canonical key: verified bytes the producer can no longer change).
SELECT dataset_version::text AS dataset_version, state, object_key, range_start, range_end,
       partition_key, size
FROM dataset_partitions
WHERE dataset_version = ANY(%(versions)s::uuid[]) AND superseded_at IS NULL
ORDER BY dataset_version, range_start NULLS LAST, partition_key;

-- name: lock_pin
-- A pin's holder and org, one row per pinned version (one pin lies in one org), locked.
SELECT n.subject AS holder, d.org_id::text AS org_id
FROM dataset_pins n
JOIN dataset_versions v ON v.dataset_version = n.dataset_version
JOIN datasets d ON d.dataset_uuid = v.dataset_uuid
WHERE n.pin_id = %(pin_id)s
FOR UPDATE OF n;

-- name: release_pin
-- End a reader's pin lease early.
DELETE FROM dataset_pins WHERE pin_id = %(pin_id)s;

-- name: lock_version_for_purge
-- Lock a version of a dataset and say whether it is active or pinned.
SELECT v.state,
       EXISTS (SELECT 1 FROM datasets d JOIN dags g ON g.dag_id = d.dag_id
               JOIN dag_pointers p ON p.dag_id = g.dag_id AND p.generation = g.active_generation
               WHERE d.dataset_uuid = v.dataset_uuid AND p.dataset_version = v.dataset_version),
       EXISTS (SELECT 1 FROM dataset_pins n
               WHERE n.dataset_version = v.dataset_version AND n.expires_at > now())
FROM dataset_versions v
WHERE v.dataset_version = %(version)s AND v.dataset_uuid = %(dataset_uuid)s
FOR UPDATE;

-- name: mark_purged
-- Mark a version purged (its partitions' objects are deleted after commit).
UPDATE dataset_versions SET state = 'purged', purged_at = coalesce(purged_at, now())
WHERE dataset_version = %(version)s;

-- name: purged_partitions
-- Partitions of a purged version still to delete from storage.
SELECT partition_id, object_key, staged_key FROM dataset_partitions
WHERE dataset_version = %(version)s ORDER BY partition_id LIMIT %(n)s;

-- name: delete_partitions
-- Forget partitions whose objects were deleted.
DELETE FROM dataset_partitions WHERE partition_id = ANY(%(ids)s::bigint[]);

-- name: commit_targets
-- Resolve manifest dataset names in an org to their target versions (explicit or active);
-- locks the versions FOR SHARE so a purge cannot run under a commit.
WITH c AS (
    SELECT * FROM unnest(%(names)s::text[], %(versions)s::uuid[]) AS c(name, version)
), t AS (
    SELECT c.name, c.version AS asked, d.dataset_uuid, d.update_strategy,
           coalesce(c.version, p.dataset_version) AS dataset_version
    FROM c
    JOIN datasets d ON d.org_id = %(org_id)s AND d.name = c.name
    JOIN dags g ON g.dag_id = d.dag_id
    LEFT JOIN dag_pointers p ON p.dag_id = g.dag_id AND p.generation = g.active_generation
                            AND p.dataset_uuid = d.dataset_uuid
)
SELECT t.name, t.asked::text, t.dataset_uuid::text, t.update_strategy,
       t.dataset_version::text, v.state
FROM t JOIN dataset_versions v
  ON v.dataset_version = t.dataset_version AND v.dataset_uuid = t.dataset_uuid
ORDER BY v.dataset_version
FOR SHARE OF v;

-- name: live_partitions
-- Live partitions of versions that a manifest's ranges or keys touch.
SELECT partition_id, dataset_version::text, range_start, range_end, partition_key
FROM dataset_partitions
WHERE dataset_version = ANY(%(versions)s::uuid[]) AND superseded_at IS NULL
  AND ((range_start IS NOT NULL AND range_start < %(max_end)s AND range_end > %(min_start)s)
       OR partition_key = ANY(%(keys)s::text[]));

-- name: supersede_partitions
-- Mark partitions superseded by a replace.
UPDATE dataset_partitions SET superseded_at = now()
WHERE partition_id = ANY(%(ids)s::bigint[]) AND superseded_at IS NULL;

-- name: insert_partitions
-- Record committed partitions (the manifest's entries after the plan).
INSERT INTO dataset_partitions (dataset_version, range_start, range_end, partition_key,
                                object_key, staged_key, size, sha256, task_id, attempt)
SELECT c.v, c.s, c.e, c.k, c.ok, c.sk, c.sz, c.sh, %(task_id)s, %(attempt)s
FROM unnest(%(versions)s::uuid[], %(starts)s::bigint[], %(ends)s::bigint[], %(keys)s::text[],
            %(object_keys)s::text[], %(staged_keys)s::text[], %(sizes)s::bigint[],
            %(shas)s::text[]) AS c(v, s, e, k, ok, sk, sz, sh);

-- name: insert_outbox_many
-- Outbox rows (invalidations, dataset events), in the caller's transaction.
INSERT INTO outbox (topic, payload)
SELECT %(topic)s, p FROM unnest(%(payloads)s::jsonb[]) AS p;

-- name: task_orgs
-- The org of each task (to build staging prefixes before the completion transaction).
SELECT task_id::text, org_id::text FROM tasks WHERE task_id = ANY(%(task_ids)s::uuid[]);

-- name: unswept_attempts
-- Finished attempts older than the grace period whose staging prefix was not cleaned yet.
SELECT a.task_id::text, a.attempt, t.org_id::text
FROM task_attempts a JOIN tasks t ON t.task_id = a.task_id
WHERE a.outcome <> 'running' AND a.finished_at < now() - make_interval(secs => %(grace_s)s)
  AND NOT EXISTS (SELECT 1 FROM staging_sweeps s
                  WHERE s.task_id = a.task_id AND s.attempt = a.attempt)
ORDER BY a.finished_at
LIMIT %(n)s;

-- name: referenced_staged_keys
-- Staged keys of an attempt's committed partitions that promotion has not copied yet.
SELECT staged_key FROM dataset_partitions
WHERE task_id = %(task_id)s AND attempt = %(attempt)s AND state = 'committed';

-- name: record_sweep
-- Remember that an attempt's staging prefix was cleaned.
INSERT INTO staging_sweeps (task_id, attempt, deleted) VALUES (%(task_id)s, %(attempt)s, %(deleted)s)
ON CONFLICT DO NOTHING;

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
-- Partitions by state (the /metrics gauge; `corrupt` is an alarm).
SELECT state, count(*) AS n FROM dataset_partitions GROUP BY state;

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
