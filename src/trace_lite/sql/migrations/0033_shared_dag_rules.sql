-- Rules several statements apply, written once (ADR 0037, ADR 0038):
-- * trace_announced_keys: the event keys a dag.event announcement names -- its event_keys
--   (migration 0032), or the one event_key of a row written before it;
-- * trace_dag_may_write: may a task of DAG task_dag write a dataset DAG owner_dag owns? A task
--   of no DAG may; a DAG writes the datasets it owns and those it is a registered writer of
--   (dataset_writers: a multi_writer dataset another DAG owns). The publish (tasks.sql
--   buffer_write_allowed) and the sink (sink.sql batch_targets) both ask it;
-- * trace_insert_pointer_set: a new pointer set of a DAG -- its parent overlaid with new
--   versions of some datasets -- answering its generation: a staging keeps it staged
--   (dag_remat.sql insert_staged_pointer_set), a cutover activates it in the same statement
--   (datasets.sql insert_pointer_set).
-- Safe to run twice.

CREATE OR REPLACE FUNCTION trace_announced_keys(payload jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT coalesce(payload -> 'event_keys', jsonb_build_array(payload -> 'event_key'))
$$;

CREATE OR REPLACE FUNCTION trace_dag_may_write(task_dag uuid, owner_dag uuid, dataset uuid)
RETURNS boolean LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT task_dag IS NULL OR task_dag = owner_dag
           OR EXISTS (SELECT 1 FROM dataset_writers w
                      WHERE (w.dataset_uuid, w.dag_id) = (dataset, task_dag))
$$;

CREATE OR REPLACE FUNCTION trace_insert_pointer_set(
    set_dag uuid, set_parent bigint, set_created_by text, set_datasets uuid[], set_versions uuid[]
) RETURNS bigint LANGUAGE sql VOLATILE AS $$
    WITH s AS (
        INSERT INTO dag_pointer_sets (dag_id, generation, parent_generation, created_by)
        SELECT set_dag, coalesce(max(p.generation), 0) + 1, set_parent, set_created_by
        FROM dag_pointer_sets p WHERE p.dag_id = set_dag
        RETURNING generation
    ), ptr AS (
        INSERT INTO dag_pointers (dag_id, generation, dataset_uuid, dataset_version)
        SELECT set_dag, s.generation, x.dataset_uuid, x.dataset_version
        FROM s, (
            SELECT c.dataset_uuid, c.dataset_version
            FROM unnest(set_datasets, set_versions) AS c(dataset_uuid, dataset_version)
            UNION ALL
            SELECT p.dataset_uuid, p.dataset_version FROM dag_pointers p
            WHERE p.dag_id = set_dag AND p.generation = set_parent
              AND p.dataset_uuid <> ALL(set_datasets)
        ) x
    )
    SELECT generation FROM s
$$;
