-- Worker-pool slot leases (trace_lite.pool_slots): which attempt holds slot `slot` of pool `pool`
-- of a DAG. A slot is held exactly while the attempt a row names is running (task_attempts
-- outcome 'running'): completion, failure, timeout, cancel and lease expiry (the reaper) end the
-- attempt and so free the slot in the same transaction; a row naming an ended attempt is free
-- and is overwritten by the next claim. Claims of one pool serialize on an advisory lock.
-- Safe to run twice.
CREATE TABLE IF NOT EXISTS pool_slot_leases (
    dag_id   uuid NOT NULL,
    pool     text NOT NULL,
    slot     int NOT NULL CHECK (slot >= 0),
    dag_job  text NOT NULL,
    task_id  uuid NOT NULL,
    attempt  int NOT NULL CHECK (attempt >= 1),
    PRIMARY KEY (dag_id, pool, slot)
);
CREATE UNIQUE INDEX IF NOT EXISTS pool_slot_leases_attempt_idx
    ON pool_slot_leases (task_id, attempt);
