-- A buffer batch's scope (cursor, partition key or block range; NULL for none), part of the
-- dedupe key of every row the sink stores from it (trace_core.sink.Scope).
ALTER TABLE buffer_batches ADD COLUMN IF NOT EXISTS scope jsonb;
