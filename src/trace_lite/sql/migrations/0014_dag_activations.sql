-- DAG rollback (trace_lite.dag_control): the history of what each DAG ran -- which version with
-- which dataset pointer set -- so a rollback restores the previous pair in one transaction.
-- Safe to run twice.

-- One row per activation of a DAG: a deploy that stored a new version, or a rollback.
-- previous_seq is the activation a rollback of this one restores (NULL: nothing to roll back to);
-- a rollback's own row takes the restored activation's previous_seq, so rollbacks step back.
CREATE TABLE IF NOT EXISTS dag_activations (
    dag_id        uuid NOT NULL REFERENCES dags (dag_id),
    seq           bigint NOT NULL CHECK (seq >= 1),
    version       bigint NOT NULL,
    generation    bigint,
    previous_seq  bigint,
    reason        text NOT NULL CHECK (reason IN ('deploy', 'rollback')),
    created_by    text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (dag_id, seq),
    FOREIGN KEY (dag_id, version) REFERENCES dag_versions (dag_id, version),
    CHECK (previous_seq IS NULL OR previous_seq < seq)
);

-- DAGs deployed before this migration: their active pair is their first activation.
INSERT INTO dag_activations (dag_id, seq, version, generation, previous_seq, reason, created_by)
SELECT g.dag_id, 1, g.active_version, g.active_generation, NULL, 'deploy', 'platform'
FROM dags g
WHERE g.active_version IS NOT NULL
  AND NOT EXISTS (SELECT 1 FROM dag_activations a WHERE a.dag_id = g.dag_id);
