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

-- The job definitions new DAG tasks are created from: each job of a DAG's active version, except
-- the jobs a building staging rebuilds, whose definitions come from the staged version
-- (``staged``). ``epoch`` is the version of the latest cut-over or building staging that rebuilt
-- the job (NULL: never rebuilt); task idempotency keys carry it, so the events a rebuild replays
-- and the same events drained after the cutover make one task.
CREATE OR REPLACE VIEW dag_live_jobs AS
SELECT g.dag_id, g.org_id, g.name AS dag, j.version, j.job, j.operator, j.runtime, j.config,
       j.timeout_s, j.max_attempts, j.triggers, v.created_at AS deployed_at, false AS staged,
       (SELECT max(e.version) FROM dag_rematerializations e
        WHERE e.dag_id = g.dag_id AND e.state IN ('cut_over', 'building')
          AND e.version <= j.version AND j.job = ANY(e.rebuild)) AS epoch
FROM dags g
JOIN dag_jobs j ON j.dag_id = g.dag_id AND j.version = g.active_version
JOIN dag_versions v ON v.dag_id = j.dag_id AND v.version = j.version
WHERE NOT EXISTS (SELECT 1 FROM dag_rematerializations m
                  WHERE m.dag_id = g.dag_id AND m.state = 'building'
                    AND j.job = ANY(m.rebuild))
UNION ALL
SELECT g.dag_id, g.org_id, g.name, j.version, j.job, j.operator, j.runtime, j.config,
       j.timeout_s, j.max_attempts, j.triggers, v.created_at, true, m.version
FROM dag_rematerializations m
JOIN dags g ON g.dag_id = m.dag_id
JOIN dag_jobs j ON j.dag_id = m.dag_id AND j.version = m.version AND j.job = ANY(m.rebuild)
JOIN dag_versions v ON v.dag_id = j.dag_id AND v.version = j.version
WHERE m.state = 'building';

-- A freed worker-pool slot wakes the tasks waiting for one (trace_lite.pool_slots): when an
-- attempt holding a slot lease ends (completion, failure, timeout, acknowledged cancel, lease
-- expiry), the oldest queued task of each job of that DAG using the pool gets a wake-up in the
-- same transaction. A claim that finds no free slot is refused as not claimable (its wake-up is
-- dropped): this is what wakes it again. Extra wake-ups are harmless (claimed or refused once).
CREATE OR REPLACE FUNCTION trace_wake_pool_waiters() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    woken int;
BEGIN
    WITH freed AS (
        SELECT DISTINCT l.dag_id, l.pool
        FROM ended_new n
        JOIN ended_old o ON o.task_id = n.task_id AND o.attempt = n.attempt
        JOIN pool_slot_leases l ON l.task_id = n.task_id AND l.attempt = n.attempt
        WHERE o.outcome = 'running' AND n.outcome <> 'running'
    ), waiting AS (
        SELECT DISTINCT ON (t.dag_id, t.dag_job) t.task_id
        FROM freed f
        JOIN tasks t ON t.dag_id = f.dag_id AND t.state = 'queued'
        JOIN dag_versions v ON v.dag_id = t.dag_id AND v.version = t.dag_version
        WHERE v.spec -> 'jobs' -> t.dag_job ->> 'worker_pool' = f.pool
        ORDER BY t.dag_id, t.dag_job, t.created_at, t.task_id
    ), ins AS (
        INSERT INTO outbox (topic, payload)
        SELECT 'wake', jsonb_build_object('task_id', w.task_id::text) FROM waiting w
        RETURNING 1
    )
    SELECT count(*) INTO woken FROM ins;
    IF woken > 0 THEN
        PERFORM pg_notify('trace_outbox', '');
    END IF;
    RETURN NULL;
END $$;
DROP TRIGGER IF EXISTS task_attempts_wake_pool_waiters ON task_attempts;
CREATE TRIGGER task_attempts_wake_pool_waiters AFTER UPDATE ON task_attempts
    REFERENCING OLD TABLE AS ended_old NEW TABLE AS ended_new
    FOR EACH STATEMENT EXECUTE FUNCTION trace_wake_pool_waiters();

-- An input's where filter as the spec stores it ('{}': none), read by the fan-out for every
-- event without reading the version's whole spec; NULL for versions deployed before this
-- migration (the fan-out falls back to the spec).
ALTER TABLE dag_inputs ADD COLUMN IF NOT EXISTS where_filter jsonb;
