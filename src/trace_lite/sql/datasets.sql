-- Dataset registry, versions, pointer sets, resolve, pins and purge (trace_lite.datasets). The
-- kernel (trace_core.access) decides who may; these statements read and apply. Orgs and members
-- are in orgs.sql, the output commit in outputs.sql, promotion and sweeping in dataset_gc.sql.

-- name: dag_by_name
-- A DAG of an org, locked for a pointer-set change.
SELECT dag_id::text AS dag_id, active_generation FROM dags
WHERE org_id = %(org_id)s AND name = %(name)s FOR UPDATE;

-- name: dag_id_by_name
-- A DAG of an org (no lock).
SELECT dag_id::text AS dag_id FROM dags WHERE org_id = %(org_id)s AND name = %(name)s;

-- name: insert_dataset
-- Register a dataset; the name is unique per org.
INSERT INTO datasets (dataset_uuid, org_id, name, dag_id, job_name, output_index, storage_kind,
                      schema, update_strategy, unique_key, read_roles)
VALUES (gen_random_uuid(), %(org_id)s, %(name)s, %(dag_id)s, %(job_name)s, %(output_index)s,
        %(storage_kind)s, %(schema)s, %(update_strategy)s, %(unique_key)s, %(read_roles)s)
RETURNING dataset_uuid::text AS dataset_uuid;

-- name: dataset_by_name
-- One dataset of an org with its ACL fields and producer metadata.
SELECT d.dataset_uuid::text AS dataset_uuid, d.name, d.dag_id::text AS dag_id, d.read_roles,
       d.storage_kind, d.update_strategy, d.unique_key, d.job_name, d.output_index, d.schema,
       g.name AS dag
FROM datasets d JOIN dags g ON g.dag_id = d.dag_id
WHERE d.org_id = %(org_id)s AND d.name = %(name)s;

-- name: list_datasets
-- Every dataset of an org with its active version.
SELECT d.dataset_uuid::text AS dataset_uuid, d.name, d.dag_id::text AS dag_id, d.read_roles,
       d.storage_kind, d.update_strategy, g.name AS dag,
       p.dataset_version::text AS active_version
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
RETURNING dataset_version::text AS dataset_version;

-- name: dataset_versions
-- A dataset's versions with partition counts, whether active, and live pins.
SELECT v.dataset_version::text AS dataset_version, v.state, v.created_at, v.purged_at,
       (SELECT count(*) FROM dataset_partitions p
        WHERE p.dataset_version = v.dataset_version AND p.superseded_at IS NULL)
           AS live_partitions,
       EXISTS (SELECT 1 FROM datasets d JOIN dags g ON g.dag_id = d.dag_id
               JOIN dag_pointers pt ON pt.dag_id = g.dag_id AND pt.generation = g.active_generation
               WHERE d.dataset_uuid = v.dataset_uuid AND pt.dataset_version = v.dataset_version)
           AS active,
       (SELECT count(*) FROM dataset_pins n
        WHERE n.dataset_version = v.dataset_version AND n.expires_at > now()) AS pins
FROM dataset_versions v WHERE v.dataset_uuid = %(dataset_uuid)s
ORDER BY v.created_at, v.dataset_version;

-- name: dag_pointer_history
-- A DAG's pointer sets (newest first) with their pointers.
SELECT s.generation, s.parent_generation, s.created_by, s.created_at,
       s.generation = g.active_generation AS active,
       coalesce(jsonb_object_agg(d.name, p.dataset_version::text)
                FILTER (WHERE d.name IS NOT NULL), '{}'::jsonb) AS pointers
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
SELECT d.name, d.dataset_uuid::text AS dataset_uuid, v.dataset_version::text AS dataset_version,
       v.state
FROM datasets d
JOIN unnest(%(names)s::text[], %(versions)s::uuid[]) AS c(name, version) ON c.name = d.name
LEFT JOIN dataset_versions v ON v.dataset_version = c.version AND v.dataset_uuid = d.dataset_uuid
WHERE d.dag_id = %(dag_id)s;

-- name: insert_pointer_set
-- Cut over: a new generation = the active set overlaid with the new pointers
-- (trace_insert_pointer_set, migration 0033); then activate it (CAS on the active generation).
-- One statement, one transaction: no row when the CAS failed (the caller rolls back).
WITH s AS (
    SELECT trace_insert_pointer_set(%(dag_id)s::uuid, %(expected)s::bigint,
                                    %(created_by)s::text, %(dataset_uuids)s::uuid[],
                                    %(versions)s::uuid[]) AS generation
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
                 AND v.state = 'purged') AS names_purged
FROM dag_pointer_sets s WHERE s.dag_id = %(dag_id)s AND s.generation = %(generation)s;

-- name: activate_generation
-- Roll back: move the active pointer to another generation (CAS on the active generation).
UPDATE dags SET active_generation = %(generation)s
WHERE dag_id = %(dag_id)s AND active_generation IS NOT DISTINCT FROM %(expected)s
RETURNING active_generation AS generation;

-- name: task_org
-- The org of a task, from its row (a task resolves in that org, whatever its token says), and
-- the staged pointer set of its DAG it reads through when its version is a building staging.
SELECT t.org_id::text AS org_id, o.name AS org_name, m.dag_id::text AS staged_dag_id,
       m.generation AS staged_generation
FROM tasks t JOIN orgs o ON o.org_id = t.org_id
LEFT JOIN dag_rematerializations m ON m.dag_id = t.dag_id AND m.version = t.dag_version
                                  AND m.state = 'building'
WHERE t.task_id = %(task_id)s;

-- name: resolve
-- Pin each named dataset to its active version: read the active pointer sets and write pin
-- rows in ONE statement (one snapshot: a whole set, never a mix), then lock the pinned versions
-- FOR SHARE so a concurrent purge either waits for this pin or is seen (state = purged).
WITH r AS (
    SELECT d.name, d.dataset_uuid, d.dag_id, d.read_roles, d.storage_kind, p.dataset_version
    FROM datasets d
    JOIN dags g ON g.dag_id = d.dag_id
    LEFT JOIN dag_pointers p
           ON p.dag_id = g.dag_id AND p.dataset_uuid = d.dataset_uuid
          AND p.generation = CASE WHEN g.dag_id = %(staged_dag)s::uuid
                                  THEN %(staged_generation)s::bigint
                                  ELSE g.active_generation END
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
SELECT r.name, r.dataset_uuid::text AS dataset_uuid, r.dag_id::text AS dag_id, r.read_roles,
       r.storage_kind, r.dataset_version::text AS dataset_version, lock.state AS version_state
FROM r LEFT JOIN lock ON lock.dataset_version = r.dataset_version;

-- name: version_objects
-- The live partitions of versions with their state; readers are handed the promoted ones only
-- (their canonical key: verified bytes the producer can no longer change).
SELECT dataset_version::text AS dataset_version, state, object_key, range_start AS start,
       range_end AS "end", partition_key AS key, size
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
-- Lock a version of a dataset and say whether it is active, staged (in the pointer set of a
-- building rematerialization, dag_remat.sql) or pinned.
SELECT v.state,
       EXISTS (SELECT 1 FROM datasets d JOIN dags g ON g.dag_id = d.dag_id
               JOIN dag_pointers p ON p.dag_id = g.dag_id AND p.generation = g.active_generation
               WHERE d.dataset_uuid = v.dataset_uuid AND p.dataset_version = v.dataset_version)
           AS active,
       EXISTS (SELECT 1 FROM datasets d
               JOIN dag_rematerializations m ON m.dag_id = d.dag_id AND m.state = 'building'
               JOIN dag_pointers p ON p.dag_id = m.dag_id AND p.generation = m.generation
               WHERE d.dataset_uuid = v.dataset_uuid AND p.dataset_version = v.dataset_version)
           AS staged,
       EXISTS (SELECT 1 FROM dataset_pins n
               WHERE n.dataset_version = v.dataset_version AND n.expires_at > now()) AS pinned
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
