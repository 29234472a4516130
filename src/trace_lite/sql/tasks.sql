-- Task lifecycle queries (trace_lite.tasks, trace_lite.reaper, trace_lite.outbox_publisher;
-- their rows are the classes of trace_lite.task_rows, read by name). The kernel
-- (trace_core.lifecycle) decides every transition; these statements read the rows it needs and
-- apply its decisions as compare-and-swaps on the fence (task_id, attempt, lease_token). Batch
-- forms take parallel arrays and unnest them.

-- name: ensure_org
-- Create the org if it does not exist; return its id.
INSERT INTO orgs (org_id, name) VALUES (gen_random_uuid(), %(name)s)
ON CONFLICT (name) DO UPDATE SET name = EXCLUDED.name
RETURNING org_id::text;

-- name: insert_tasks
-- Insert new tasks in the state the kernel chose (decide_create); idempotency-key duplicates
-- are skipped.
INSERT INTO tasks (task_id, org_id, operator, payload, state, max_attempts, timeout_s,
                   available_at, idempotency_key, runtime, read_datasets)
SELECT c.task_id, c.org_id, c.operator, c.payload, c.state, c.max_attempts, c.timeout_s,
       now() + make_interval(secs => c.delay_s), c.idempotency_key, c.runtime,
       ARRAY(SELECT jsonb_array_elements_text(c.read_datasets))
FROM unnest(%(task_ids)s::uuid[], %(org_ids)s::uuid[], %(operators)s::text[],
            %(payloads)s::jsonb[], %(states)s::text[], %(max_attempts)s::int[],
            %(timeouts)s::int[], %(delays)s::float8[], %(idempotency_keys)s::text[],
            %(runtimes)s::text[], %(read_datasets)s::jsonb[])
     AS c(task_id, org_id, operator, payload, state, max_attempts, timeout_s, delay_s,
          idempotency_key, runtime, read_datasets)
ON CONFLICT (org_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
RETURNING task_id::text, org_id::text, operator, state, attempt, max_attempts, idempotency_key;

-- name: tasks_by_idempotency_key
-- Existing tasks for idempotency keys (to answer a repeated create).
SELECT task_id::text, org_id::text, operator, state, attempt, max_attempts, idempotency_key
FROM tasks
WHERE (org_id, idempotency_key) IN (
    SELECT * FROM unnest(%(org_ids)s::uuid[], %(idempotency_keys)s::text[]));

-- name: insert_wakes
-- Outbox rows that start each task, written in the caller's transaction: a queue wake-up for
-- worker tasks, an invoke for runtime: lambda tasks.
INSERT INTO outbox (topic, payload, available_at)
SELECT CASE WHEN t.runtime = 'lambda' THEN 'invoke' ELSE %(topic)s END,
       jsonb_build_object('task_id', t.task_id::text), now()
FROM tasks t
WHERE t.task_id = ANY(%(task_ids)s::uuid[]);

-- name: listen_outbox
-- Subscribe a publisher's connection to outbox notifications.
LISTEN trace_outbox;

-- name: notify_outbox
-- Tell outbox publishers that rows are due (delivered at commit).
SELECT pg_notify('trace_outbox', '');

-- name: notify_tasks
-- Tell in-process claimers that tasks are queued (delivered at commit).
SELECT pg_notify('trace_tasks', '');

-- name: lock_tasks
-- Lock tasks with their current attempt for a decision; waits for other writers. lock_expired
-- and lock_due return the same columns (the task_heads view, migration 0010, plus the current
-- attempt and the database's now(): trace_lite.task_rows.LockedTask).
SELECT h.*, a.outcome, a.completion_digest, a.started_at, now() AS now
FROM task_heads h
LEFT JOIN task_attempts a ON a.task_id = h.task_id AND a.attempt = h.attempt
WHERE h.task_id = ANY(%(task_ids)s::uuid[])
ORDER BY h.task_id
FOR UPDATE OF h;

-- name: lock_tasks_for_claim
-- Lock tasks named by wake-ups, with everything a claim answers (trace_lite.task_rows.ClaimRow);
-- rows another claimer holds are skipped (not claimable now). The payload comes as text: it is
-- checked before anything commits.
SELECT h.*, p.payload::text AS payload, now() AS now
FROM task_heads h
JOIN tasks p ON p.task_id = h.task_id
WHERE h.task_id = ANY(%(task_ids)s::uuid[])
ORDER BY h.task_id
FOR UPDATE OF h SKIP LOCKED;

-- name: task_org
-- The org that owns a task (it never changes), to check a capability token's org_id claim.
SELECT org_id::text FROM tasks WHERE task_id = %(task_id)s;

-- name: existing_tasks
-- Which of these task ids exist (to tell a locked row from a missing one).
SELECT task_id::text FROM tasks WHERE task_id = ANY(%(task_ids)s::uuid[]);

-- name: lock_next_queued
-- Lock up to n queued, due tasks for in-process claimers (oldest first), with everything a
-- claim answers (as lock_tasks_for_claim).
SELECT h.*, p.payload::text AS payload, now() AS now
FROM task_heads h
JOIN tasks p ON p.task_id = h.task_id
WHERE h.state = 'queued' AND h.available_at <= now()
ORDER BY h.available_at
LIMIT %(n)s
FOR UPDATE OF h SKIP LOCKED;

-- name: apply_claims
-- Start attempts: CAS each task from its previous attempt to the new one, record the attempt.
WITH c AS (
    SELECT * FROM unnest(%(task_ids)s::uuid[], %(prev_attempts)s::int[], %(attempts)s::int[],
                         %(lease_tokens)s::uuid[], %(expires)s::timestamptz[])
         AS c(task_id, prev_attempt, attempt, lease_token, expires)
), claimed AS (
    UPDATE tasks t
    SET state = 'running', attempt = c.attempt, lease_token = c.lease_token,
        lease_expires_at = c.expires, updated_at = now()
    FROM c
    WHERE t.task_id = c.task_id AND t.attempt = c.prev_attempt AND t.state = 'queued'
    RETURNING t.task_id, t.attempt, t.lease_token, t.lease_expires_at
), hist AS (
    INSERT INTO task_attempts (task_id, attempt, lease_token, worker_id, lease_expires_at)
    SELECT task_id, attempt, lease_token, %(worker_id)s, lease_expires_at FROM claimed
)
SELECT task_id::text FROM claimed;

-- name: fail_unservable
-- Fail queued tasks whose payload cannot be served, as the kernel decided (no attempt starts).
UPDATE tasks t
SET state = c.state, error = c.error, finished_at = c.finished_at, updated_at = now()
FROM unnest(%(task_ids)s::uuid[], %(states)s::text[], %(errors)s::jsonb[],
            %(finished_ats)s::timestamptz[]) AS c(task_id, state, error, finished_at)
WHERE t.task_id = c.task_id AND t.state = 'queued'
RETURNING t.task_id::text;

-- name: apply_heartbeat
-- Extend the current attempt's lease (CAS on the fence).
WITH t AS (
    UPDATE tasks SET lease_expires_at = %(expires)s, updated_at = now()
    WHERE task_id = %(task_id)s AND attempt = %(attempt)s AND lease_token = %(lease_token)s
      AND state = 'running'
    RETURNING task_id, attempt
)
UPDATE task_attempts a SET heartbeat_at = now(), lease_expires_at = %(expires)s
FROM t WHERE a.task_id = t.task_id AND a.attempt = t.attempt
RETURNING a.task_id;

-- name: insert_events
-- Record events; a key the task already emitted is skipped (dedupe by producer task + key).
INSERT INTO task_events (task_id, event_key, attempt, event_type, payload)
SELECT %(task_id)s, e.key, %(attempt)s, e.type, e.payload
FROM unnest(%(keys)s::text[], %(types)s::text[], %(payloads)s::jsonb[]) AS e(key, type, payload)
ON CONFLICT (task_id, event_key) DO NOTHING
RETURNING event_key;

-- name: insert_buffer_batch
-- Record a buffer batch pointer; a repeated key is skipped.
INSERT INTO buffer_batches (task_id, batch_key, attempt, dataset, object_key, row_count,
                            byte_size, sha256, scope, inline_rows)
VALUES (%(task_id)s, %(key)s, %(attempt)s, %(dataset)s, %(object_key)s, %(row_count)s,
        %(byte_size)s, %(sha256)s, %(scope)s, %(rows)s)
ON CONFLICT (task_id, batch_key) DO NOTHING
RETURNING batch_key;

-- name: buffer_batch
-- An already recorded buffer batch (to tell a replay from a conflicting reuse of its key).
SELECT dataset, object_key, row_count, byte_size, sha256, attempt, scope
FROM buffer_batches WHERE task_id = %(task_id)s AND batch_key = %(key)s;

-- name: buffer_write_allowed
-- May this task publish a buffer batch into the dataset named? A task of a DAG writes only the
-- datasets its DAG owns or is a registered writer of (trace_dag_may_write, migration 0033; ADR
-- 0037); the sink asks the same rule (sql/sink.sql batch_targets). A name the org has not
-- registered (never forwarded) is not refused here.
SELECT (d.dag_id IS NULL OR trace_dag_may_write(t.dag_id, d.dag_id, d.dataset_uuid)) AS allowed
FROM tasks t
LEFT JOIN datasets d ON d.org_id = t.org_id AND d.name = %(dataset)s
WHERE t.task_id = %(task_id)s;

-- name: insert_outbox
-- One outbox row, in the caller's transaction.
INSERT INTO outbox (topic, payload) VALUES (%(topic)s, %(payload)s);

-- name: insert_buffer_announcement
-- A buffer batch's outbox row (topic buffer:<dataset>), in the publishing transaction, and
-- NOTIFY trace_buffer (delivered at the commit) so an idle buffer forwarder forwards it at once
-- instead of at its next poll (trace_lite.buffer_forwarder).
WITH announced AS (
    INSERT INTO outbox (topic, payload) VALUES (%(topic)s, %(payload)s) RETURNING id
)
SELECT pg_notify('trace_buffer', '') FROM announced;

-- name: apply_completions
-- Finish attempts: CAS each task on its fence and write the whole next row the kernel decided.
WITH c AS (
    SELECT * FROM unnest(%(task_ids)s::uuid[], %(attempts)s::int[], %(lease_tokens)s::uuid[],
                         %(states)s::text[], %(outcomes)s::text[], %(available_ats)s::timestamptz[],
                         %(lease_expires_ats)s::timestamptz[], %(finished_ats)s::timestamptz[],
                         %(results)s::jsonb[], %(errors)s::jsonb[], %(digests)s::text[])
         AS c(task_id, attempt, lease_token, state, outcome, available_at, lease_expires_at,
              finished_at, result, error, digest)
), done AS (
    UPDATE tasks t
    SET state = c.state, available_at = c.available_at, lease_expires_at = c.lease_expires_at,
        finished_at = c.finished_at, result = c.result, error = c.error, updated_at = now()
    FROM c
    WHERE t.task_id = c.task_id AND t.attempt = c.attempt AND t.lease_token = c.lease_token
    RETURNING t.task_id, t.attempt
), hist AS (
    UPDATE task_attempts a
    SET outcome = c.outcome, finished_at = now(), completion_digest = c.digest, error = c.error
    FROM c JOIN done d ON d.task_id = c.task_id
    WHERE a.task_id = c.task_id AND a.attempt = c.attempt
)
SELECT task_id::text FROM done;

-- name: lock_expired
-- Lock running tasks whose lease expired (the database's clock decides), for the reaper. The
-- kernel caps every lease at the attempt's timeout_s, so attempts past it are found here too.
SELECT h.*, a.outcome, a.completion_digest, a.started_at, now() AS now
FROM task_heads h
LEFT JOIN task_attempts a ON a.task_id = h.task_id AND a.attempt = h.attempt
WHERE h.state = 'running' AND h.lease_expires_at < now()
ORDER BY h.lease_expires_at
LIMIT %(n)s
FOR UPDATE OF h SKIP LOCKED;

-- name: apply_expiries
-- End attempts as the kernel decided (retry later or fail): the whole next row, CAS on the fence.
WITH c AS (
    SELECT * FROM unnest(%(task_ids)s::uuid[], %(attempts)s::int[], %(lease_tokens)s::uuid[],
                         %(states)s::text[], %(available_ats)s::timestamptz[],
                         %(finished_ats)s::timestamptz[], %(errors)s::jsonb[],
                         %(outcomes)s::text[])
         AS c(task_id, attempt, lease_token, state, available_at, finished_at, error, outcome)
), done AS (
    UPDATE tasks t
    SET state = c.state, available_at = c.available_at, lease_expires_at = NULL,
        finished_at = c.finished_at, error = c.error, updated_at = now()
    FROM c
    WHERE t.task_id = c.task_id AND t.attempt = c.attempt AND t.lease_token = c.lease_token
      AND t.state = 'running'
    RETURNING t.task_id, t.attempt
)
UPDATE task_attempts a SET outcome = c.outcome, finished_at = now()
FROM done d JOIN c ON c.task_id = d.task_id
WHERE a.task_id = d.task_id AND a.attempt = d.attempt
RETURNING a.task_id::text;

-- name: expire_canceled_attempts
-- Close running attempts of canceled tasks whose lease ran out (the worker never reported).
UPDATE task_attempts a SET outcome = 'canceled', finished_at = now()
FROM tasks t
WHERE a.task_id = t.task_id AND a.attempt = t.attempt AND t.state = 'canceled'
  AND a.outcome = 'running' AND a.lease_expires_at < now()
RETURNING a.task_id::text;

-- name: lock_due
-- Lock pending tasks whose backoff elapsed, for the reaper.
SELECT h.*, a.outcome, a.completion_digest, a.started_at, now() AS now
FROM task_heads h
LEFT JOIN task_attempts a ON a.task_id = h.task_id AND a.attempt = h.attempt
WHERE h.state = 'pending' AND h.available_at <= now()
ORDER BY h.available_at
LIMIT %(n)s
FOR UPDATE OF h SKIP LOCKED;

-- name: apply_due
-- Move due pending tasks to queued.
UPDATE tasks SET state = 'queued', updated_at = now()
WHERE task_id = ANY(%(task_ids)s::uuid[]) AND state = 'pending'
RETURNING task_id::text;

-- name: lock_stale_queued
-- Queued tasks nobody claimed for a while: their wake-up was lost (dead-lettered, deleted while
-- the row was locked). The reaper wakes them again; wake-ups are hints, so extras are harmless.
SELECT task_id::text FROM tasks
WHERE state = 'queued' AND available_at <= now() AND updated_at < now() - %(older_than)s::interval
ORDER BY updated_at
LIMIT %(n)s
FOR UPDATE SKIP LOCKED;

-- name: touch_tasks
-- Mark tasks as re-woken now.
UPDATE tasks SET updated_at = now() WHERE task_id = ANY(%(task_ids)s::uuid[]);

-- name: apply_cancel
-- Cancel a task (the kernel decided it is not final yet).
UPDATE tasks SET state = 'canceled', finished_at = now(), updated_at = now()
WHERE task_id = %(task_id)s AND state = %(expected_state)s
RETURNING task_id;

-- name: get_task
-- One task, for fetch and inspection. JSON columns come as text: a stored value that cannot be
-- served (written around the API, or before today's limits) is reported, never a crash.
SELECT t.task_id::text, t.org_id::text, t.job_id::text, t.operator, t.payload::text AS payload,
       t.state, t.attempt, t.lease_expires_at, t.max_attempts, t.timeout_s, t.available_at,
       t.result::text AS result, t.error::text AS error, t.created_at, t.updated_at,
       t.finished_at
FROM tasks t WHERE t.task_id = %(task_id)s;

-- name: task_attempts
-- A task's attempt history.
SELECT attempt, worker_id, started_at, heartbeat_at, lease_expires_at, finished_at, outcome,
       error::text AS error
FROM task_attempts WHERE task_id = %(task_id)s ORDER BY attempt;

-- name: task_events
-- A task's recorded events in order (payloads as text, as get_task).
SELECT event_key, attempt, event_type, payload::text AS payload, created_at
FROM task_events WHERE task_id = %(task_id)s ORDER BY seq;

-- name: claim_outbox
-- Claim due outbox rows of the topics this publisher consumes (rows of other topics stay
-- pending for their consumer); rows other publishers hold are skipped.
SELECT id, topic, payload, tries, now() AS now
FROM outbox
WHERE state = 'pending' AND available_at <= now() AND topic = ANY(%(topics)s::text[])
ORDER BY available_at, id
LIMIT %(n)s
FOR UPDATE SKIP LOCKED;

-- name: outbox_published
-- Record sent rows as the kernel decided (decide_sent: published, tries + 1).
UPDATE outbox o
SET state = c.state, tries = c.tries, published_at = now()
FROM unnest(%(ids)s::bigint[], %(states)s::text[], %(tries)s::int[]) AS c(id, state, tries)
WHERE o.id = c.id AND o.state = 'pending';

-- name: outbox_failed
-- Record failed sends: back off or mark dead, as the kernel decided.
UPDATE outbox o
SET state = c.state, tries = c.tries, available_at = coalesce(c.available_at, o.available_at),
    last_error = %(error)s
FROM unnest(%(ids)s::bigint[], %(states)s::text[], %(tries)s::int[],
            %(available_ats)s::timestamptz[]) AS c(id, state, tries, available_at)
WHERE o.id = c.id AND o.state = 'pending';

-- name: purge_published_outbox
-- Delete published outbox rows older than the retention.
DELETE FROM outbox WHERE state = 'published' AND published_at < now() - %(older_than)s::interval;

-- name: task_counts
-- How many tasks are in each state (for metrics and progress).
SELECT state, count(*) AS n FROM tasks GROUP BY state;

-- name: outbox_counts
-- Outbox rows by state (for metrics).
SELECT state, count(*) AS n FROM outbox GROUP BY state;
