-- Deployed DAGs (trace_lite.dags): immutable versions of a DAG file, their jobs and input edges,
-- the active version per DAG, the DAG job a task runs for, its lineage (task_inputs), and the
-- announcement of events of DAG tasks to the fan-out (outbox topic 'dag.event').
-- Safe to run twice.

-- The version new events and triggers run against; NULL until the first deploy.
ALTER TABLE dags ADD COLUMN IF NOT EXISTS active_version bigint;

-- A dataset declared multi-writer (several DAGs may publish it: buffered append sinks).
ALTER TABLE datasets ADD COLUMN IF NOT EXISTS multi_writer boolean NOT NULL DEFAULT false;

-- One deployed DAG file, as trace_core.dag.to_doc wrote it. Never updated or deleted.
CREATE TABLE IF NOT EXISTS dag_versions (
    dag_id      uuid NOT NULL REFERENCES dags (dag_id),
    version     bigint NOT NULL CHECK (version >= 1),
    digest      text NOT NULL CHECK (digest ~ '^[0-9a-f]{64}$'),
    spec        jsonb NOT NULL,
    created_by  text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (dag_id, version)
);

CREATE OR REPLACE FUNCTION trace_dag_versions_immutable() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'dag_versions rows are immutable' USING ERRCODE = 'check_violation';
END $$;

DROP TRIGGER IF EXISTS dag_versions_immutable ON dag_versions;
CREATE TRIGGER dag_versions_immutable BEFORE UPDATE OR DELETE ON dag_versions
    FOR EACH ROW EXECUTE FUNCTION trace_dag_versions_immutable();

-- The jobs of a version: what a task of the job is created with.
CREATE TABLE IF NOT EXISTS dag_jobs (
    dag_id        uuid NOT NULL,
    version       bigint NOT NULL,
    job           text NOT NULL,
    operator      text NOT NULL,
    runtime       text NOT NULL CHECK (runtime IN ('worker', 'lambda')),
    config        jsonb NOT NULL,
    timeout_s     int NOT NULL CHECK (timeout_s BETWEEN 1 AND 900),
    max_attempts  int NOT NULL CHECK (max_attempts BETWEEN 1 AND 100),
    -- [{type, schedule?, every?}] (source jobs only)
    triggers      jsonb NOT NULL DEFAULT '[]'::jsonb,
    PRIMARY KEY (dag_id, version, job),
    FOREIGN KEY (dag_id, version) REFERENCES dag_versions (dag_id, version)
);

-- The edges of a version: input input_index of job reads output from_output of job from_job of
-- the same DAG, or the published dataset from_dataset (of another DAG).
CREATE TABLE IF NOT EXISTS dag_inputs (
    dag_id        uuid NOT NULL,
    version       bigint NOT NULL,
    job           text NOT NULL,
    input_index   int NOT NULL CHECK (input_index >= 0),
    from_job      text,
    from_output   int,
    from_dataset  text,
    PRIMARY KEY (dag_id, version, job, input_index),
    FOREIGN KEY (dag_id, version, job) REFERENCES dag_jobs (dag_id, version, job),
    CHECK ((from_job IS NULL) = (from_output IS NULL)),
    CHECK ((from_job IS NULL) <> (from_dataset IS NULL))
);
CREATE INDEX IF NOT EXISTS dag_inputs_from_job_idx
    ON dag_inputs (dag_id, version, from_job, from_output) WHERE from_job IS NOT NULL;
CREATE INDEX IF NOT EXISTS dag_inputs_from_dataset_idx
    ON dag_inputs (from_dataset) WHERE from_dataset IS NOT NULL;

-- The DAG job a task runs for (NULL for tasks created through the admin API).
ALTER TABLE tasks ADD COLUMN IF NOT EXISTS dag_id uuid;
ALTER TABLE tasks ADD COLUMN IF NOT EXISTS dag_version bigint;
ALTER TABLE tasks ADD COLUMN IF NOT EXISTS dag_job text;
CREATE INDEX IF NOT EXISTS tasks_dag_job_idx
    ON tasks (dag_id, dag_version, dag_job) WHERE dag_id IS NOT NULL;

-- Lineage: the event a task was created for and the dataset version its input read.
CREATE TABLE IF NOT EXISTS task_inputs (
    task_id           uuid NOT NULL REFERENCES tasks (task_id),
    input_index       int NOT NULL CHECK (input_index >= 0),
    producer_task_id  uuid NOT NULL,
    event_key         text NOT NULL,
    event_seq         bigint NOT NULL,
    dataset_uuid      uuid,
    dataset_version   uuid,
    PRIMARY KEY (task_id, input_index)
);
CREATE INDEX IF NOT EXISTS task_inputs_producer_idx ON task_inputs (producer_task_id);

-- Every event a DAG task records is announced to the fan-out in the same transaction: an outbox
-- row of topic 'dag.event' (a key the task already emitted inserts nothing, so announces
-- nothing). The fan-out marks the row published in the transaction that creates its tasks.
CREATE OR REPLACE FUNCTION trace_announce_dag_events() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO outbox (topic, payload)
    SELECT 'dag.event', jsonb_build_object('task_id', e.task_id::text, 'event_key', e.event_key)
    FROM new_events e JOIN tasks t ON t.task_id = e.task_id
    WHERE t.dag_id IS NOT NULL;
    RETURN NULL;
END $$;

DROP TRIGGER IF EXISTS task_events_announce ON task_events;
CREATE TRIGGER task_events_announce AFTER INSERT ON task_events
    REFERENCING NEW TABLE AS new_events
    FOR EACH STATEMENT EXECUTE FUNCTION trace_announce_dag_events();
