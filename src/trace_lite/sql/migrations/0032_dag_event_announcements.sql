-- The fan-out's writes per event (ADR 0038):
-- * one announcement per task per emitting statement: the outbox row of topic 'dag.event' names
--   the task and the keys of the events that statement recorded for it, in order
--   ({task_id, event_keys: [...]}), instead of one row per event. A fan-out pass locks and
--   consumes announcements, so a task emitting 1,000 events in one call costs one outbox row,
--   one lock and one update, not 1,000. Rows written before this migration
--   ({task_id, event_key}) are still read (dags.sql claim_dag_events);
--   The announcement also names what its events were produced on, each once ("srcs":
--   [[output, sink dataset], ...]), so a pass finds their consumers without reading the events;
--   The trigger sends NOTIFY trace_dag_events (delivered at the commit) so an idle fan-out
--   loop plans the events at once instead of at its next poll (trace_lite.dag_runs);
-- * lineage rows (task_inputs) no longer carry a foreign key to tasks: they are written only
--   by the statement or transaction that creates their task (the fan-out, a rebuild's replay,
--   an invalidation's reruns), tasks are never deleted, and the per-row constraint trigger
--   cost as much as the lineage row itself;
-- * outbox payloads are stored uncompressed (STORAGE EXTERNAL): they are read once or twice and
--   purged, and a fan-out pass's wake-up row (thousands of task ids) cost more to compress than
--   to write.
-- Safe to run twice.

-- The output an event belongs to: payload.output when that is an integer, else 0.
CREATE OR REPLACE FUNCTION trace_event_output(payload jsonb) RETURNS int
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN jsonb_typeof(payload -> 'output') = 'number'
                THEN (payload ->> 'output')::int ELSE 0 END
$$;

-- The dataset a sink event (key sink/...) names; '' for other events.
CREATE OR REPLACE FUNCTION trace_event_sink_dataset(event_key text, payload jsonb) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN starts_with(event_key, 'sink/')
                THEN coalesce(payload ->> 'dataset_uuid', '') ELSE '' END
$$;

CREATE OR REPLACE FUNCTION trace_announce_dag_events() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    announced int;
BEGIN
    INSERT INTO outbox (topic, payload)
    SELECT 'dag.event',
           jsonb_build_object(
               'task_id', e.task_id::text,
               'event_keys', jsonb_agg(e.event_key ORDER BY e.seq),
               'srcs', jsonb_agg(DISTINCT jsonb_build_array(
                   trace_event_output(e.payload),
                   trace_event_sink_dataset(e.event_key, e.payload))))
    FROM new_events e JOIN tasks t ON t.task_id = e.task_id
    WHERE t.dag_id IS NOT NULL
    GROUP BY e.task_id;
    GET DIAGNOSTICS announced = ROW_COUNT;
    IF announced > 0 THEN
        PERFORM pg_notify('trace_dag_events', '');  -- wakes an idle fan-out (at the commit)
    END IF;
    RETURN NULL;
END $$;

ALTER TABLE task_inputs DROP CONSTRAINT IF EXISTS task_inputs_task_id_fkey;

ALTER TABLE outbox ALTER COLUMN payload SET STORAGE EXTERNAL;
