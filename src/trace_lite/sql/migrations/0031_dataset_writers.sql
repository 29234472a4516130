-- Datasets written by several DAGs (trace_lite.dag_registry, ADR 0037). A dataset's registry row
-- (datasets.dag_id) names its owner: the first DAG that registered it, whose pointer set holds
-- its versions. Another DAG of the org publishing the same name, when both declare it a buffered
-- multi_writer output with the same schema and unique_key, is recorded here as a writer: its
-- tasks may publish batches into it (tasks.sql buffer_write_allowed, sink.sql batch_targets),
-- which land in the version the owner's active pointer set names. One row per (dataset, writer
-- DAG), refreshed by each deploy or cutover of the writer; removed when its new version no longer
-- publishes the dataset. Safe to run twice.
CREATE TABLE IF NOT EXISTS dataset_writers (
    dataset_uuid  uuid NOT NULL REFERENCES datasets (dataset_uuid),
    dag_id        uuid NOT NULL REFERENCES dags (dag_id),
    -- the writer's (last) publish entry for the dataset
    job_name      text NOT NULL,
    output_index  int  NOT NULL CHECK (output_index >= 0),
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (dataset_uuid, dag_id)
);
CREATE INDEX IF NOT EXISTS dataset_writers_dag_idx ON dataset_writers (dag_id);
