-- Buffer batches may carry their rows inline (wire.BufferBatchIn.rows) instead of naming a staged
-- object: such a batch has no object_key, and byte_size/sha256 describe its rows as canonical
-- JSON lines (trace_core.sink.inline_lines), which inline_rows holds byte for byte.
ALTER TABLE buffer_batches ALTER COLUMN object_key DROP NOT NULL;
ALTER TABLE buffer_batches ADD COLUMN IF NOT EXISTS inline_rows text;
