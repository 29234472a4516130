-- Publishers claim only the outbox topics they consume; rows of topics without a consumer yet
-- (buffer:<dataset>, dataset.invalidate) stay pending. Index pending rows by topic so those
-- rows, however many, never slow the claim of wake-ups.
CREATE INDEX IF NOT EXISTS outbox_topic_due_idx
    ON outbox (topic, available_at, id) WHERE state = 'pending';
