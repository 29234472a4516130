-- A committed partition's object state (trace_core.commit.PartitionState), replacing the
-- `promoted` flag: committed (bytes at the staged key, not readable), promoted (verified and
-- copied to the canonical key; readers read only these), corrupt (the staged bytes no longer
-- matched what the completion committed; an alarm, never readable, never retried).
-- Safe to run twice.

ALTER TABLE dataset_partitions ADD COLUMN IF NOT EXISTS state text NOT NULL DEFAULT 'committed';

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM information_schema.columns
               WHERE table_schema = current_schema() AND table_name = 'dataset_partitions'
                 AND column_name = 'promoted') THEN
        UPDATE dataset_partitions SET state = 'promoted' WHERE promoted;
    END IF;
END $$;

ALTER TABLE dataset_partitions DROP CONSTRAINT IF EXISTS dataset_partitions_state_check;
ALTER TABLE dataset_partitions ADD CONSTRAINT dataset_partitions_state_check
    CHECK (state IN ('committed', 'promoted', 'corrupt'));

DROP INDEX IF EXISTS dataset_partitions_unpromoted_idx;
ALTER TABLE dataset_partitions DROP COLUMN IF EXISTS promoted;
CREATE INDEX IF NOT EXISTS dataset_partitions_committed_idx
    ON dataset_partitions (partition_id) WHERE state = 'committed';
