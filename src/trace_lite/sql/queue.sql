-- Trace Lite queue statements (trace_lite.pg_queue). Every statement runs alone in autocommit;
-- every operation is one round trip. Times come from the database's now() only.
-- Wake-ups: statements that make messages available notify channel 'trace_queue' with the queue
-- name as payload, in the same transaction (delivered at commit).

-- name: send
-- Insert a batch of messages in order, notify long-polling receivers; returns ids in input order.
WITH sent AS (
    INSERT INTO queue_messages (queue, body, visible_at)
    SELECT %(queue)s, t.body, now() + make_interval(secs => %(delay)s::double precision)
    FROM unnest(%(bodies)s::bytea[]) WITH ORDINALITY AS t (body, ord)
    ORDER BY t.ord
    RETURNING id
)
SELECT sent.id
FROM sent CROSS JOIN (SELECT pg_notify('trace_queue', %(queue)s::text)) AS woken
ORDER BY sent.id;

-- name: receive
-- Dead-letter visible over-limit messages, then lease up to n visible ones with fresh receipts.
WITH expired AS MATERIALIZED (
    SELECT id
    FROM queue_messages
    WHERE queue = %(queue)s AND NOT dead AND visible_at <= now()
      AND receive_count >= %(max_receives)s
    ORDER BY visible_at, id
    LIMIT 100
    FOR UPDATE SKIP LOCKED
), buried AS (
    UPDATE queue_messages AS m
    SET dead = true, dead_at = now(), receipt = NULL
    FROM expired
    WHERE m.id = expired.id
    RETURNING m.id
), picked AS MATERIALIZED (
    SELECT id
    FROM queue_messages
    WHERE queue = %(queue)s AND NOT dead AND visible_at <= now()
      AND receive_count < %(max_receives)s
    ORDER BY visible_at, id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), leased AS (
    UPDATE queue_messages
    SET receive_count = receive_count + 1,
        receipt = gen_random_uuid(),
        visible_at = now() + make_interval(secs => %(visibility)s::double precision)
    WHERE id IN (SELECT id FROM picked)
    RETURNING id, body, receipt, receive_count
)
SELECT id, body, receipt, receive_count FROM leased ORDER BY id;

-- name: extend
-- Compare-and-swap on the receipt: hide the message for more seconds; no row = stale receipt.
UPDATE queue_messages
SET visible_at = now() + make_interval(secs => %(visibility)s::double precision)
WHERE queue = %(queue)s AND receipt = %(receipt)s AND NOT dead
RETURNING id;

-- name: delete
-- Delete messages (or dead letters) by their latest receipts; stale receipts match nothing.
DELETE FROM queue_messages
WHERE queue = %(queue)s AND receipt = ANY (%(receipts)s::uuid[]);

-- name: dead_letter
-- Move received messages to the dead-letter queue now, each with its reason; stale receipts
-- match nothing.
UPDATE queue_messages AS m
SET dead = true, dead_at = now(), receipt = NULL, dead_reason = r.reason
FROM unnest(%(receipts)s::uuid[], %(reasons)s::text[]) AS r (receipt, reason)
WHERE m.queue = %(queue)s AND m.receipt = r.receipt AND NOT m.dead;

-- name: dead_letters
-- Issue fresh receipts to up to n dead letters, oldest first, leaving them dead.
WITH picked AS MATERIALIZED (
    SELECT id
    FROM queue_messages
    WHERE queue = %(queue)s AND dead
    ORDER BY id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), issued AS (
    UPDATE queue_messages
    SET receipt = gen_random_uuid()
    WHERE id IN (SELECT id FROM picked)
    RETURNING id, body, receipt, receive_count, dead_reason
)
SELECT id, body, receipt, receive_count, dead_reason FROM issued ORDER BY id;

-- name: redrive
-- Move up to n dead letters back to the queue as fresh messages and notify; returns how many.
WITH picked AS MATERIALIZED (
    SELECT id
    FROM queue_messages
    WHERE queue = %(queue)s AND dead
    ORDER BY id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), moved AS (
    UPDATE queue_messages
    SET dead = false, dead_at = NULL, dead_reason = NULL, receipt = NULL, receive_count = 0,
        visible_at = now(), sent_at = now()
    WHERE id IN (SELECT id FROM picked)
    RETURNING id
)
SELECT count(*) AS moved, pg_notify('trace_queue', %(queue)s::text) AS woken FROM moved;

-- name: depth
-- Messages neither deleted nor dead: visible, in flight or delayed.
SELECT count(*) FROM queue_messages WHERE queue = %(queue)s AND NOT dead;
