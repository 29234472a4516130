-- Buffer queues of buffered Postgres datasets (trace_lite.buffer_queues, ADR 0023). A dataset
-- registered (or re-registered) with storage_kind 'buffered_postgres' gets its queue row in the
-- same transaction, by the trigger below: a DAG deploy that declares the dataset records its
-- queue atomically with the registry. The queue is then created on the queue backend (SQS and
-- its DLQ on AWS; nothing to create for the Postgres queue) by a provisioning pass that sets
-- provisioned_at; a failed creation backs off (tries, available_at, last_error). Safe to run
-- twice.

CREATE TABLE IF NOT EXISTS buffer_queues (
    dataset_uuid    uuid        PRIMARY KEY REFERENCES datasets (dataset_uuid) ON DELETE CASCADE,
    -- 'buffer-<dataset_uuid>': trace_lite.buffer_forwarder.queue_name spells the same
    queue           text        NOT NULL UNIQUE,
    created_at      timestamptz NOT NULL DEFAULT now(),
    -- when the backend queue (and its DLQ) was created; NULL until then
    provisioned_at  timestamptz,
    tries           int         NOT NULL DEFAULT 0 CHECK (tries >= 0),
    available_at    timestamptz NOT NULL DEFAULT now(),
    last_error      text
);

-- The provisioning pass: queues not created yet, due first.
CREATE INDEX IF NOT EXISTS buffer_queues_pending_idx
    ON buffer_queues (available_at) WHERE provisioned_at IS NULL;

CREATE OR REPLACE FUNCTION trace_register_buffer_queue() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.storage_kind = 'buffered_postgres' THEN
        INSERT INTO buffer_queues (dataset_uuid, queue)
        VALUES (NEW.dataset_uuid, 'buffer-' || NEW.dataset_uuid::text)
        ON CONFLICT (dataset_uuid) DO NOTHING;
    END IF;
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS datasets_buffer_queue ON datasets;
CREATE TRIGGER datasets_buffer_queue AFTER INSERT OR UPDATE OF storage_kind ON datasets
    FOR EACH ROW EXECUTE FUNCTION trace_register_buffer_queue();

-- Buffered datasets registered before this migration.
INSERT INTO buffer_queues (dataset_uuid, queue)
SELECT dataset_uuid, 'buffer-' || dataset_uuid::text
FROM datasets WHERE storage_kind = 'buffered_postgres'
ON CONFLICT (dataset_uuid) DO NOTHING;
