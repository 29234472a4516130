-- Alert delivery (trace_lite.delivery). The kernel (trace_core.delivery) decides every move;
-- these statements apply it as a compare-and-swap on the fence columns.

-- name: insert_destination
-- Add a destination of an org (a second one with the same name is a Conflict).
INSERT INTO alert_destinations (destination_id, org_id, name, kind, url, secret_name)
VALUES (%(destination_id)s, %(org_id)s, %(name)s, %(kind)s, %(url)s, %(secret_name)s);

-- name: destination
-- One destination by id.
SELECT destination_id, org_id, name, kind, url, secret_name, enabled, disabled_reason
FROM alert_destinations WHERE destination_id = %(destination_id)s;

-- name: destination_by_name
-- One destination of an org by name.
SELECT destination_id, org_id, name, kind, url, secret_name, enabled, disabled_reason
FROM alert_destinations
WHERE org_id = %(org_id)s AND name = %(name)s AND deleted_at IS NULL;

-- name: set_destination_enabled
-- Enable or disable a destination, with the reason it was disabled.
UPDATE alert_destinations
SET enabled = %(enabled)s, disabled_reason = %(reason)s, updated_at = now()
WHERE destination_id = %(destination_id)s;

-- name: disable_due_of_destination
-- The due deliveries of a disabled destination become disabled (decide_disable for each).
UPDATE alert_deliveries
SET state = 'disabled', last_error = %(reason)s, updated_at = now()
WHERE destination_id = %(destination_id)s AND state = 'due';

-- name: db_now
-- The database's clock: every decision is taken at this time.
SELECT now() AS now;

-- name: insert_delivery
-- Record a routed delivery once: the same delivery key (event, route, destination) is a no-op.
INSERT INTO alert_deliveries (delivery_id, org_id, destination_id, delivery_key, alert_key, route,
                              event_time, payload, state, suppressed_reason)
VALUES (%(delivery_id)s, %(org_id)s, %(destination_id)s, %(delivery_key)s, %(alert_key)s,
        %(route)s, %(event_time)s, %(payload)s, %(state)s, %(suppressed_reason)s)
ON CONFLICT (delivery_key) DO NOTHING;

-- name: delivery_by_key
-- A delivery's id and state by its key.
SELECT delivery_id, state FROM alert_deliveries WHERE delivery_key = %(delivery_key)s;

-- name: lock_due
-- Lease candidates: due deliveries, oldest first, skipping rows another sender holds.
SELECT d.delivery_id, d.state, d.attempt, d.lease_token, d.lease_expires_at, d.available_at,
       d.delivery_key, d.org_id, d.destination_id, d.route, d.alert_key, d.event_time,
       d.payload, t.kind, t.url, t.secret_name, t.enabled, now() AS now
FROM alert_deliveries d JOIN alert_destinations t USING (destination_id)
WHERE d.state = 'due' AND d.available_at <= now()
ORDER BY d.available_at, d.delivery_id
LIMIT %(n)s
FOR UPDATE OF d SKIP LOCKED;

-- name: apply_lease
-- Start an attempt (decide_lease): CAS on the attempt the decision saw.
UPDATE alert_deliveries
SET state = 'in_flight', attempt = %(attempt)s, lease_token = %(lease_token)s,
    lease_expires_at = %(lease_expires_at)s, updated_at = now()
WHERE delivery_id = %(delivery_id)s AND attempt = %(attempt)s - 1 AND state = 'due';

-- name: insert_attempt
-- The row of a new attempt.
INSERT INTO delivery_attempts (delivery_id, attempt, lease_token, sender)
VALUES (%(delivery_id)s, %(attempt)s, %(lease_token)s, %(sender)s);

-- name: lock_delivery
-- One delivery, locked, with the database's clock.
SELECT delivery_id, state, attempt, lease_token, lease_expires_at, available_at, destination_id,
       now() AS now
FROM alert_deliveries WHERE delivery_id = %(delivery_id)s
FOR UPDATE;

-- name: apply_outcome
-- End the current attempt (decide_outcome): CAS on the fence.
UPDATE alert_deliveries
SET state = %(state)s, available_at = %(available_at)s, lease_expires_at = NULL,
    last_error = %(error)s, last_status = %(status_code)s, updated_at = now(),
    sent_at = CASE WHEN %(state)s = 'sent' THEN now() ELSE sent_at END
WHERE delivery_id = %(delivery_id)s AND attempt = %(attempt)s AND lease_token = %(lease_token)s
  AND state = 'in_flight';

-- name: finish_attempt
-- Record how an attempt ended (only once: a late report of an expired attempt is kept out).
UPDATE delivery_attempts
SET outcome = %(outcome)s, finished_at = now(), status_code = %(status_code)s,
    latency_ms = %(latency_ms)s, error = %(error)s
WHERE delivery_id = %(delivery_id)s AND attempt = %(attempt)s AND outcome = 'in_flight';

-- name: lock_expired
-- In-flight deliveries whose lease lapsed, skipping rows another reaper holds.
SELECT delivery_id, state, attempt, lease_token, lease_expires_at, available_at, now() AS now
FROM alert_deliveries
WHERE state = 'in_flight' AND lease_expires_at <= now()
ORDER BY lease_expires_at
LIMIT %(n)s
FOR UPDATE SKIP LOCKED;

-- name: apply_move
-- A move without a lease (expire, retry, disable): CAS on the state and attempt it decided on.
UPDATE alert_deliveries
SET state = %(state)s, available_at = %(available_at)s, lease_expires_at = NULL,
    last_error = coalesce(%(error)s, last_error), updated_at = now()
WHERE delivery_id = %(delivery_id)s AND attempt = %(attempt)s AND state = %(from_state)s;

-- name: delivery_counts
-- Deliveries by state, and the age of the oldest due one (metrics).
SELECT state, count(*) AS n,
       coalesce(extract(epoch FROM now() - min(available_at) FILTER (WHERE available_at <= now())),
                0)::float8 AS oldest_s
FROM alert_deliveries GROUP BY state;

-- name: list_deliveries
-- Deliveries of an org, newest first, optionally of one state.
SELECT d.delivery_id, d.state, d.attempt, d.route, d.alert_key, d.event_time, d.available_at,
       d.last_error, d.last_status, d.suppressed_reason, d.created_at, d.sent_at,
       t.name AS destination
FROM alert_deliveries d JOIN alert_destinations t USING (destination_id)
WHERE d.org_id = %(org_id)s AND (%(state)s::text IS NULL OR d.state = %(state)s)
ORDER BY d.created_at DESC, d.delivery_id
LIMIT %(limit)s;

-- name: delivery_attempts
-- The attempts of one delivery, in order.
SELECT attempt, sender, started_at, finished_at, outcome, status_code, latency_ms, error
FROM delivery_attempts WHERE delivery_id = %(delivery_id)s ORDER BY attempt;

-- name: task_scope
-- The org of a task and whether the attempt is its running one (locked against its
-- completion while deliveries are recorded for it).
SELECT org_id::text AS org_id, (state = 'running' AND attempt = %(attempt)s) AS running
FROM tasks WHERE task_id = %(task_id)s
FOR SHARE;

-- name: destinations_by_names
-- The live destinations of an org with these names.
SELECT destination_id, org_id, name, kind, url, secret_name, enabled, disabled_reason
FROM alert_destinations
WHERE org_id = %(org_id)s AND name = ANY(%(names)s) AND deleted_at IS NULL;

-- name: deliveries_by_keys
-- The state of deliveries by key.
SELECT delivery_key, state FROM alert_deliveries WHERE delivery_key = ANY(%(keys)s);

-- name: list_destinations
-- The live destinations of an org, by name.
SELECT destination_id, org_id, name, kind, url, secret_name, enabled, disabled_reason
FROM alert_destinations
WHERE org_id = %(org_id)s AND deleted_at IS NULL
ORDER BY name;

-- name: update_destination
-- Change a live destination's name, URL or kind (NULL keeps the value).
UPDATE alert_destinations
SET name = coalesce(%(name)s, name), url = coalesce(%(url)s, url),
    kind = coalesce(%(kind)s, kind), updated_at = now()
WHERE destination_id = %(destination_id)s AND deleted_at IS NULL;

-- name: delete_destination
-- Mark a live destination deleted (and disabled); its rows stay for its deliveries' history.
UPDATE alert_destinations
SET deleted_at = now(), enabled = false, disabled_reason = 'deleted', updated_at = now()
WHERE destination_id = %(destination_id)s AND deleted_at IS NULL;

-- name: live_destination
-- One live destination of an org by id.
SELECT destination_id, org_id, name, kind, url, secret_name, enabled, disabled_reason
FROM alert_destinations
WHERE destination_id = %(destination_id)s AND org_id = %(org_id)s AND deleted_at IS NULL;
