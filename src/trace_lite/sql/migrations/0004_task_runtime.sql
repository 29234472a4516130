-- Where a task runs: 'worker' (woken through the queue) or 'lambda' (invoked by the Dispatcher).
ALTER TABLE tasks ADD COLUMN IF NOT EXISTS runtime text NOT NULL DEFAULT 'worker'
    CHECK (runtime IN ('worker', 'lambda'));
