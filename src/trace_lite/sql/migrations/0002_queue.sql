-- Trace Lite queue: the Postgres-backed Queue port (trace_lite.pg_queue), one table for all queues.
-- Timestamps come from the database's now() only; worker clocks are never trusted.
-- A message is visible when NOT dead AND visible_at <= now(); receiving it bumps receive_count,
-- issues a fresh receipt and pushes visible_at out by the visibility timeout. A message that has
-- already been received max_receives times is marked dead (the dead-letter queue) when it would
-- next be delivered. Deleting a message deletes its row. Safe to run twice.

CREATE TABLE IF NOT EXISTS queue_messages (
    id             bigserial   PRIMARY KEY,
    queue          text        NOT NULL CHECK (queue <> ''),
    body           bytea       NOT NULL CHECK (octet_length(body) <= 262144),
    -- when the message may next be delivered (send + delay, or receive + visibility timeout)
    visible_at     timestamptz NOT NULL DEFAULT now(),
    -- deliveries so far; reset to 0 by a redrive
    receive_count  int         NOT NULL DEFAULT 0 CHECK (receive_count >= 0),
    -- the handle of the latest receive; only it can extend or delete the message
    receipt        uuid,
    -- in the dead-letter queue: never delivered again until redriven
    dead           boolean     NOT NULL DEFAULT false,
    dead_at        timestamptz,
    -- when the row was first inserted
    created_at     timestamptz NOT NULL DEFAULT now(),
    -- when the message was last put on the queue (its send, or its latest redrive)
    sent_at        timestamptz NOT NULL DEFAULT now(),
    CHECK (dead = (dead_at IS NOT NULL))
);

-- The receive path: visible live messages of one queue, oldest first.
CREATE INDEX IF NOT EXISTS queue_messages_receive_idx
    ON queue_messages (queue, visible_at) WHERE NOT dead;

-- The dead-letter queue of one queue, oldest first.
CREATE INDEX IF NOT EXISTS queue_messages_dead_idx
    ON queue_messages (queue, id) WHERE dead;

-- extend / delete find a message by its latest receipt.
CREATE UNIQUE INDEX IF NOT EXISTS queue_messages_receipt_idx
    ON queue_messages (receipt) WHERE receipt IS NOT NULL;
