-- Two rules several statements apply, written once (ADR 0037, ADR 0038):
-- * trace_announced_keys: the event keys a dag.event announcement names -- its event_keys
--   (migration 0032), or the one event_key of a row written before it;
-- * trace_dag_may_write: may a task of DAG task_dag write a dataset DAG owner_dag owns? A task
--   of no DAG may; a DAG writes the datasets it owns and those it is a registered writer of
--   (dataset_writers: a multi_writer dataset another DAG owns). The publish (tasks.sql
--   buffer_write_allowed) and the sink (sink.sql batch_targets) both ask it.
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
