-- Rematerialization and invalidation cascades (trace_lite.dag_remat,
-- trace_lite.dag_invalidations). Safe to run twice.

-- A deploy whose diff rebuilds jobs stages its version instead of activating it: the staged
-- version, the pointer set its rebuilt jobs commit to (the active set overlaid with a new
-- dataset version per dataset they publish), and the jobs it rebuilds. At most one staging per
-- DAG is building; it ends cut over (the version and pointer set went live in one transaction)
-- or abandoned (a later deploy or a rollback replaced it; its tasks were canceled).
CREATE TABLE IF NOT EXISTS dag_rematerializations (
    dag_id        uuid NOT NULL REFERENCES dags (dag_id),
    version       bigint NOT NULL,
    from_version  bigint NOT NULL,
    generation    bigint NOT NULL,
    rebuild       text[] NOT NULL,
    state         text NOT NULL DEFAULT 'building'
                  CHECK (state IN ('building', 'cut_over', 'abandoned')),
    created_by    text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    ended_at      timestamptz,
    PRIMARY KEY (dag_id, version),
    FOREIGN KEY (dag_id, version) REFERENCES dag_versions (dag_id, version),
    FOREIGN KEY (dag_id, generation) REFERENCES dag_pointer_sets (dag_id, generation)
);
CREATE UNIQUE INDEX IF NOT EXISTS dag_rematerializations_building_idx
    ON dag_rematerializations (dag_id) WHERE state = 'building';

-- A cutover is an activation too (rollback steps back over it like over a deploy).
ALTER TABLE dag_activations DROP CONSTRAINT IF EXISTS dag_activations_reason_check;
ALTER TABLE dag_activations ADD CONSTRAINT dag_activations_reason_check
    CHECK (reason IN ('deploy', 'rollback', 'cutover'));

-- Invalidation cascades look up the tasks that read a dataset.
CREATE INDEX IF NOT EXISTS task_inputs_dataset_idx
    ON task_inputs (dataset_uuid) WHERE dataset_uuid IS NOT NULL;
