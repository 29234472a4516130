-- Durable operator state (trace_lite.operator_state): one JSON document per (org, job, input
-- dataset), written with a compare-and-swap on its version by the running attempt of a task of
-- that job. Used by range_aggregator. Safe to run twice.
CREATE TABLE IF NOT EXISTS operator_state (
    org_id              uuid NOT NULL REFERENCES orgs (org_id),
    -- the job's identity: '{dag_id}/{job}' for a DAG task, the job's uuid otherwise, or
    -- 'key/{payload.state_key}' for a task created without a job
    job_key             text NOT NULL CHECK (length(job_key) BETWEEN 1 AND 300),
    -- the input dataset the state folds (the nil uuid when the state is not per input)
    input_dataset_uuid  uuid NOT NULL DEFAULT '00000000-0000-0000-0000-000000000000',
    state               jsonb NOT NULL,
    version             bigint NOT NULL CHECK (version >= 1),
    updated_by_task     uuid NOT NULL,
    updated_at          timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (org_id, job_key, input_dataset_uuid)
);
