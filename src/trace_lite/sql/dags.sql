-- Deployed DAGs (trace_lite.dags, trace_lite.dag_runs): versions, jobs, edges, the registry
-- facts validation needs, DAG tasks (triggers, schedules, fan-out) and their lineage. The kernel
-- (trace_core.dag, trace_core.access, trace_core.lifecycle) decides; these statements read and
-- apply. Migration 0011 holds the tables.

-- name: ensure_dag
-- Create a DAG row if missing (a first deploy); nothing when it exists.
INSERT INTO dags (dag_id, org_id, name) VALUES (gen_random_uuid(), %(org_id)s, %(name)s)
ON CONFLICT (org_id, name) DO NOTHING;

-- name: lock_dag
-- A DAG of an org with its active version, locked for a deploy (deploys of one DAG serialize).
SELECT dag_id::text AS dag_id, active_version, active_generation FROM dags
WHERE org_id = %(org_id)s AND name = %(name)s FOR UPDATE;

-- name: dag
-- A DAG of an org with its active version and pointer set (no lock).
SELECT dag_id::text AS dag_id, active_version, active_generation FROM dags
WHERE org_id = %(org_id)s AND name = %(name)s;

-- name: deployers
-- The subjects that deploy a DAG (dag_members relation 'deployer').
SELECT subject FROM dag_members WHERE dag_id = %(dag_id)s AND relation = 'deployer';

-- name: add_deployer
-- Make the subject that first deployed a DAG one of its deployers.
INSERT INTO dag_members (dag_id, subject, relation) VALUES (%(dag_id)s, %(subject)s, 'deployer')
ON CONFLICT DO NOTHING;

-- name: version_spec
-- One version of a DAG: its digest and spec (as text: parsed by trace_core.dag.parse).
SELECT version, digest, spec::text AS spec, created_by, created_at
FROM dag_versions WHERE dag_id = %(dag_id)s AND version = %(version)s;

-- name: next_version
-- The number the next version of a DAG gets.
SELECT coalesce(max(version), 0) + 1 AS version FROM dag_versions WHERE dag_id = %(dag_id)s;

-- name: insert_version
-- Store a new immutable version.
INSERT INTO dag_versions (dag_id, version, digest, spec, created_by)
VALUES (%(dag_id)s, %(version)s, %(digest)s, %(spec)s, %(created_by)s);

-- name: insert_jobs
-- The jobs of a new version.
INSERT INTO dag_jobs (dag_id, version, job, operator, runtime, config, timeout_s, max_attempts,
                      triggers)
SELECT %(dag_id)s, %(version)s, j.job, j.operator, j.runtime, j.config, j.timeout_s,
       j.max_attempts, j.triggers
FROM unnest(%(jobs)s::text[], %(operators)s::text[], %(runtimes)s::text[],
            %(configs)s::jsonb[], %(timeouts)s::int[], %(max_attempts)s::int[],
            %(triggers)s::jsonb[])
     AS j(job, operator, runtime, config, timeout_s, max_attempts, triggers);

-- name: insert_inputs
-- The input edges of a new version.
INSERT INTO dag_inputs (dag_id, version, job, input_index, from_job, from_output, from_dataset,
                        where_filter)
SELECT %(dag_id)s, %(version)s, i.job, i.input_index, i.from_job, i.from_output, i.from_dataset,
       i.where_filter
FROM unnest(%(jobs)s::text[], %(indexes)s::int[], %(from_jobs)s::text[],
            %(from_outputs)s::int[], %(from_datasets)s::text[], %(wheres)s::jsonb[])
     AS i(job, input_index, from_job, from_output, from_dataset, where_filter);

-- name: activate_version
-- Make a version the DAG's active one.
UPDATE dags SET active_version = %(version)s WHERE dag_id = %(dag_id)s;

-- name: list_dags
-- The DAGs of an org with their active version.
SELECT g.name, g.active_version, v.digest, v.created_by, v.created_at
FROM dags g LEFT JOIN dag_versions v ON v.dag_id = g.dag_id AND v.version = g.active_version
WHERE g.org_id = %(org_id)s ORDER BY g.name;

-- name: list_versions
-- Every version of a DAG, newest first.
SELECT version, digest, created_by, created_at
FROM dag_versions WHERE dag_id = %(dag_id)s ORDER BY version DESC;

-- name: published_by
-- The datasets a DAG produces (the registry's view of its publish list).
SELECT name, job_name AS job, output_index AS output, dataset_uuid::text AS dataset_uuid
FROM datasets WHERE dag_id = %(dag_id)s ORDER BY name;

-- name: source_job
-- A job of a DAG as new tasks are created from it (dag_live_jobs: the active version, or the
-- staged one for a job a staging rebuilds), with whether it is a source (no inputs), for a
-- trigger.
SELECT j.dag_id::text AS dag_id, j.version, j.operator, j.runtime, j.config::text AS config,
       j.timeout_s, j.max_attempts, j.triggers::text AS triggers, j.epoch,
       NOT EXISTS (SELECT 1 FROM dag_inputs i
                   WHERE (i.dag_id, i.version, i.job) = (j.dag_id, j.version, j.job)) AS is_source
FROM dag_live_jobs j
WHERE j.org_id = %(org_id)s AND j.dag = %(dag)s AND j.job = %(job)s;

-- name: insert_dag_tasks
-- Create tasks of DAG jobs in the state the kernel chose (decide_create), with their read grants
-- (trace_lite.dag_grants; a JSON array of dataset names per task); a task whose idempotency key
-- its org already has is skipped (a repeated trigger, schedule slot or event). The batch is one
-- JSON array of rows (one parameter: no per-element array quoting).
INSERT INTO tasks (task_id, org_id, operator, payload, state, max_attempts, timeout_s,
                   idempotency_key, runtime, dag_id, dag_version, dag_job, read_datasets)
SELECT c.task_id, c.org_id, c.operator, c.payload, c.state, c.max_attempts, c.timeout_s,
       c.idempotency_key, c.runtime, c.dag_id, c.dag_version, c.dag_job,
       ARRAY(SELECT jsonb_array_elements_text(c.read_datasets))
FROM jsonb_to_recordset(%(rows)s::jsonb)
     AS c(task_id uuid, org_id uuid, operator text, payload jsonb, state text, max_attempts int,
          timeout_s int, idempotency_key text, runtime text, dag_id uuid, dag_version bigint,
          dag_job text, read_datasets jsonb)
ON CONFLICT (org_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
RETURNING task_id::text AS task_id, state;

-- name: task_by_key
-- The task an idempotency key of an org already created.
SELECT task_id::text AS task_id, state FROM tasks
WHERE org_id = %(org_id)s AND idempotency_key = %(idempotency_key)s;

-- name: insert_task_inputs
-- Lineage of tasks created for events: the event and the dataset version the input reads (one
-- JSON array of rows).
INSERT INTO task_inputs (task_id, input_index, producer_task_id, event_key, event_seq,
                         dataset_uuid, dataset_version)
SELECT * FROM jsonb_to_recordset(%(rows)s::jsonb)
     AS c(task_id uuid, input_index int, producer_task_id uuid, event_key text, event_seq bigint,
          dataset_uuid uuid, dataset_version uuid)
ON CONFLICT DO NOTHING;

-- name: claim_dag_events
-- Lock announcements of DAG tasks' events for one fan-out pass; concurrent passes skip each
-- other's. An announcement names a task and the keys of the events one statement recorded for
-- it (migration 0032; a row from before it names one event_key). The pass takes the due
-- announcements in order while their events fit %(batch)s (always at least one) and answers
-- each with its task, its number of events, and what its events were produced on, each once:
-- [[output, sink dataset], ...] (trace_event_output, trace_event_sink_dataset), as the
-- announcement names them (read from its events for a row written before migration 0032).
WITH due AS (
    SELECT id, n, sum(n) OVER (ORDER BY available_at, id) AS upto
    FROM (SELECT id, available_at,
                 jsonb_array_length(trace_announced_keys(payload)) AS n
          FROM outbox
          WHERE topic = %(topic)s AND state = 'pending' AND available_at <= now()
          ORDER BY available_at, id
          LIMIT %(batch)s) d
), o AS MATERIALIZED (
    -- (MATERIALIZED: the task and keys read once per announcement, not once per event: a large
    -- payload is stored compressed)
    SELECT id, tries, available_at, (payload ->> 'task_id')::uuid AS task_id,
           trace_announced_keys(payload) AS keys,
           payload -> 'srcs' AS srcs
    FROM outbox
    WHERE id IN (SELECT id FROM due WHERE upto - n < %(batch)s)
      AND topic = %(topic)s AND state = 'pending' AND available_at <= now()
    FOR UPDATE SKIP LOCKED
)
SELECT o.id, o.tries, o.task_id::text AS task_id, jsonb_array_length(o.keys) AS events,
       coalesce(o.srcs, (
           SELECT jsonb_agg(DISTINCT jsonb_build_array(
                      trace_event_output(e.payload),
                      trace_event_sink_dataset(k.event_key, e.payload)))
           FROM jsonb_array_elements_text(o.keys) AS k(event_key)
           LEFT JOIN task_events e ON e.task_id = o.task_id AND e.event_key = k.event_key
       ))::text AS srcs
FROM o
ORDER BY o.available_at, o.id;

-- name: claimed_event_payloads
-- The events of claimed announcements (%(ids)s) with their payloads (JSON text), for the
-- consuming inputs that have a `where`: each with its announcement, task, key, output and sink
-- dataset (as claim_dag_events derives them).
SELECT o.id, o.task_uuid::text AS task_id, k.event_key,
       trace_event_output(e.payload) AS output,
       trace_event_sink_dataset(e.event_key, e.payload) AS sink_dataset,
       coalesce(e.payload, '{}')::text AS payload
FROM (SELECT id, (payload ->> 'task_id')::uuid AS task_uuid,
             trace_announced_keys(payload) AS keys
      FROM outbox WHERE id = ANY(%(ids)s::bigint[])
      OFFSET 0) o  -- (not flattened: the payload read once per announcement)
CROSS JOIN LATERAL jsonb_array_elements_text(o.keys) AS k(event_key)
LEFT JOIN task_events e ON e.task_id = o.task_uuid AND e.event_key = k.event_key;

-- name: fan_out_inputs
-- For the producers of claimed announcements (%(srcs)s: each producing task, output and sink
-- dataset once, as claim_dag_events answers them): every input of a live version (the active
-- one, a building staging's) that reads what they produced -- from: {job, output} of the
-- producer's DAG, from: {dataset} of a dataset that output publishes (or a sink event names) in
-- the org -- with the producers that reach it ([[task_id, output, sink_dataset], ...]: the
-- pass estimates the tasks of each announcement from them and applies a `where` to their
-- events) and its `where` (as the spec stores it). A superset of the pass's consumers: it
-- carries what Python decides per consuming input (read grants, `where`); fan_out applies the
-- decisions and refuses a consumer this did not answer. Locks the producers' and readers' DAG
-- rows FOR SHARE (in dag_id order): a deploy, cutover or rollback of them waits for the pass,
-- and the pass's next statement sees any that committed before.
WITH src AS (
    -- (LATERAL ... LIMIT 1: a lookup by key however the batch's size is estimated)
    SELECT s.task_id, s.output, s.sink_dataset, t.org_id, t.dag_id, t.dag_job
    FROM jsonb_to_recordset(%(srcs)s::jsonb) AS s(task_id uuid, output int, sink_dataset text)
    JOIN LATERAL (SELECT * FROM tasks t WHERE t.task_id = s.task_id LIMIT 1) t ON true
), readers AS (
    SELECT s.*, i.dag_id AS reader_dag_id, i.version, i.job, i.input_index, i.where_filter
    FROM src s JOIN dag_inputs i ON (i.dag_id, i.from_job, i.from_output)
                                  = (s.dag_id, s.dag_job, s.output)
    UNION ALL
    SELECT s.*, i.dag_id, i.version, i.job, i.input_index, i.where_filter
    FROM src s JOIN datasets d ON d.org_id = s.org_id AND (
             (d.dag_id = s.dag_id AND d.job_name = s.dag_job AND d.output_index = s.output)
             OR (s.sink_dataset <> '' AND d.dataset_uuid::text = s.sink_dataset))
    JOIN dag_inputs i ON i.from_dataset = d.name
    JOIN dags rg ON rg.dag_id = i.dag_id AND rg.org_id = s.org_id
), live AS MATERIALIZED (
    SELECT r.task_id, r.output, r.sink_dataset, r.reader_dag_id, r.version, r.job,
           r.input_index,
           CASE WHEN r.where_filter IS NOT NULL THEN r.where_filter
                ELSE (SELECT v.spec #> ARRAY['jobs', r.job, 'inputs', r.input_index::text,
                                             'where']
                      FROM dag_versions v
                      WHERE (v.dag_id, v.version) = (r.reader_dag_id, r.version))
           END AS input_where
    FROM readers r
    JOIN dags g ON g.dag_id = r.reader_dag_id
    LEFT JOIN dag_rematerializations m ON m.dag_id = g.dag_id AND m.state = 'building'
    WHERE r.version = g.active_version OR r.version = m.version
), locked AS (
    SELECT g.dag_id FROM dags g
    WHERE g.dag_id IN (SELECT dag_id FROM src UNION SELECT reader_dag_id FROM live)
    ORDER BY g.dag_id
    FOR SHARE
)
SELECT r.reader_dag_id::text AS dag_id, r.version, r.job, r.input_index,
       r.input_where::text AS input_where,
       json_agg(DISTINCT jsonb_build_array(r.task_id, r.output, r.sink_dataset))::text AS srcs
FROM live r
WHERE (SELECT count(*) FROM locked) >= 0  -- a one-time filter: the locks are always taken
GROUP BY r.reader_dag_id, r.version, r.job, r.input_index, r.input_where::text
ORDER BY 1, 2, 3, 4;

-- name: fan_out
-- One fan-out pass over claimed announcements, after fan_out_inputs locked their DAGs: plan each
-- event with every consuming live job (dag_live_jobs, inlined so every join is by key) -- the
-- producer's own DAG reading it with from: {job, output}, and DAGs of the org reading the
-- dataset that output publishes with from: {dataset} -- and, in this one statement, create the
-- tasks (idempotent by key: a repeated or concurrent pass creates nothing twice), their lineage
-- (task_inputs: the event and the dataset version read: the producing DAG's active pointer, a
-- staged producer's staged pointer set), their wake-ups (when %(wake)s: one 'wake' outbox row
-- naming every queued worker task of the pass, an 'invoke' row per runtime: lambda task), and
-- mark the announcements consumed as the kernel decided (%(sent)s: [{from_tries, state, tries}])
-- -- %(ids)s: the claimed announcements, whose events the pass reads. %(inputs)s carries each consuming input's read grants
-- and %(rejected)s the (event, input) pairs its `where` refused (both decided in Python).
-- An event belongs to output payload.output when that is an integer, else output 0. Stagings
-- decide the rest (docs/architecture/dag_deployment.md, "Rematerialization"):
-- * an event of a staged task reaches only the staged jobs of its DAG;
-- * an event of a task of an abandoned staging reaches nothing;
-- * an event of a task of a version older than a cutover that rebuilt its job reaches nothing
--   of its own DAG (the rebuild replayed that job's inputs);
-- * a staged consumer of an event of a task that is not staged is "held": the announcement
--   waits for the cutover (available_at = infinity; dag_remat.sql release_held) and is not
--   consumed, while its other consumers' tasks are created (an announcement's events share
--   their task, so a consumer held for one is held for all of them).
-- Answers the counts (consumed and held: events); the caller rolls the pass back when `unplanned`
-- (consumers %(inputs)s does not carry: a DAG deployed since fan_out_inputs read); a concurrent
-- creator of one of the keys fails the statement (unique violation: Conflict).
WITH announced AS MATERIALIZED (
    -- (MATERIALIZED: the task and keys read once per announcement, not once per event: a large
    -- payload is stored compressed)
    SELECT id, (payload ->> 'task_id')::uuid AS task_id,
           trace_announced_keys(payload) AS keys
    FROM outbox WHERE id = ANY(%(ids)s::bigint[])
), claimed AS MATERIALIZED (
    -- each event of the claimed announcements
    SELECT o.id, o.task_id, k.event_key
    FROM announced o CROSS JOIN LATERAL jsonb_array_elements_text(o.keys) AS k(event_key)
), ev AS (
    SELECT c.id AS outbox_id, e.task_id, e.event_key, e.seq, e.event_type, e.payload,
           trace_event_output(e.payload) AS output,
           trace_event_sink_dataset(e.event_key, e.payload) AS sink_dataset
    FROM claimed c
    -- (LATERAL ... LIMIT 1: a lookup by key however the batch's size is estimated)
    JOIN LATERAL (SELECT * FROM task_events e
                  WHERE (e.task_id, e.event_key) = (c.task_id, c.event_key) LIMIT 1) e ON true
), src AS MATERIALIZED (
    -- each producing (task, output, sink dataset) once, with what stagings decide for it
    SELECT s.task_id, s.output, s.sink_dataset, t.org_id, t.dag_id, t.dag_job, t.dag_version,
           m.generation AS staged_generation,
           EXISTS (SELECT 1 FROM dag_rematerializations a
                   WHERE a.dag_id = t.dag_id AND a.version = t.dag_version
                     AND a.state = 'abandoned') AS abandoned,
           EXISTS (SELECT 1 FROM dag_rematerializations c JOIN dags cg ON cg.dag_id = c.dag_id
                   WHERE c.dag_id = t.dag_id AND c.state = 'cut_over'
                     AND c.version > t.dag_version AND c.version <= cg.active_version
                     AND t.dag_job = ANY(c.rebuild)) AS superseded
    FROM (SELECT DISTINCT task_id, output, sink_dataset FROM ev) s
    JOIN LATERAL (SELECT * FROM tasks t WHERE t.task_id = s.task_id LIMIT 1) t ON true
    LEFT JOIN dag_rematerializations m ON m.dag_id = t.dag_id AND m.version = t.dag_version
                                      AND m.state = 'building'
), live AS MATERIALIZED (
    -- the versions new tasks of the producers' DAGs are created in: the active one but for the
    -- jobs a building staging rebuilds, and the staged one for those jobs
    SELECT g.dag_id, g.active_version AS version, false AS staged,
           coalesce(m.rebuild, '{}') AS rebuild
    FROM dags g
    LEFT JOIN dag_rematerializations m ON m.dag_id = g.dag_id AND m.state = 'building'
    WHERE g.dag_id IN (SELECT dag_id FROM src) AND g.active_version IS NOT NULL
    UNION ALL
    SELECT m.dag_id, m.version, true, m.rebuild FROM dag_rematerializations m
    WHERE m.dag_id IN (SELECT dag_id FROM src) AND m.state = 'building'
), consumers AS (
    SELECT s.task_id, s.output, s.sink_dataset, i.dag_id, i.version, i.job, i.input_index,
           live.staged
    FROM src s JOIN live ON live.dag_id = s.dag_id
    JOIN dag_inputs i ON (i.dag_id, i.version, i.from_job, i.from_output)
                       = (live.dag_id, live.version, s.dag_job, s.output)
    WHERE NOT s.abandoned AND NOT s.superseded
      AND (i.job = ANY(live.rebuild)) = live.staged
      AND (s.staged_generation IS NULL OR live.staged)
    UNION ALL
    SELECT s.task_id, s.output, s.sink_dataset, i.dag_id, i.version, i.job, i.input_index,
           i.version IS NOT DISTINCT FROM rm.version
    FROM src s JOIN datasets d ON d.org_id = s.org_id AND (
             (d.dag_id = s.dag_id AND d.job_name = s.dag_job AND d.output_index = s.output)
             -- a sink's rows_committed event names its dataset: every writer of a multi_writer
             -- dataset reaches its readers (trace_lite.sink)
             OR (s.sink_dataset <> '' AND d.dataset_uuid::text = s.sink_dataset))
    JOIN dag_inputs i ON i.from_dataset = d.name
    JOIN dags rg ON rg.dag_id = i.dag_id AND rg.org_id = s.org_id
    LEFT JOIN dag_rematerializations rm ON rm.dag_id = rg.dag_id AND rm.state = 'building'
    WHERE NOT s.abandoned AND s.staged_generation IS NULL
      AND ((i.version = rg.active_version AND NOT (i.job = ANY(coalesce(rm.rebuild, '{}'))))
           OR (i.version = rm.version AND i.job = ANY(rm.rebuild)))
), grants AS (
    SELECT * FROM jsonb_to_recordset(%(inputs)s::jsonb)
        AS q(dag_id uuid, version bigint, job text, input_index int, read_datasets text[])
), readers AS MATERIALIZED (
    -- each consumer once per producing (task, output): its job's task settings and epoch
    -- (dag_tasks.with_epoch), whether it is held, the dataset version it reads, its grants,
    -- and its tasks' idempotency key but for the event's key (built once, not per event)
    SELECT r.*,
           'event:' || r.task_id::text || ':' || r.output || ':' AS key_prefix,
           ':' || r.dag_id::text || ':' || r.job || ':' || r.input_index
               || coalesce('@' || r.epoch, '') AS key_suffix
    FROM (
    SELECT DISTINCT ON (k.task_id, k.output, k.sink_dataset, k.dag_id, k.version, k.job,
                        k.input_index)
           k.*, s.org_id, j.operator, j.runtime, j.config, j.timeout_s, j.max_attempts,
           (SELECT max(e.version) FROM dag_rematerializations e
            WHERE e.dag_id = k.dag_id AND e.state IN ('cut_over', 'building')
              AND e.version <= k.version AND k.job = ANY(e.rebuild)) AS epoch,
           k.staged AND s.staged_generation IS NULL AS held,
           pd.dataset_uuid, ptr.dataset_version, q.read_datasets,
           q.dag_id IS NOT NULL AS planned
    FROM consumers k
    JOIN src s ON (s.task_id, s.output, s.sink_dataset) = (k.task_id, k.output, k.sink_dataset)
    JOIN dag_jobs j ON (j.dag_id, j.version, j.job) = (k.dag_id, k.version, k.job)
    LEFT JOIN datasets pd ON pd.org_id = s.org_id AND (
                  (pd.dag_id = s.dag_id AND pd.job_name = s.dag_job
                   AND pd.output_index = s.output)
                  OR (s.sink_dataset <> '' AND pd.dataset_uuid::text = s.sink_dataset))
    -- the version read: in the pointer set of the dataset's DAG -- the producer's (its staged
    -- set for a staged producer), or the owner's active set for a writer DAG's batch of a
    -- multi_writer dataset (ADR 0037)
    LEFT JOIN dags pg ON pg.dag_id = pd.dag_id
    LEFT JOIN dag_pointers ptr ON ptr.dag_id = pg.dag_id
                              AND ptr.generation = CASE WHEN pd.dag_id = s.dag_id
                                  THEN coalesce(s.staged_generation, pg.active_generation)
                                  ELSE pg.active_generation END
                              AND ptr.dataset_uuid = pd.dataset_uuid
    LEFT JOIN grants q ON (q.dag_id, q.version, q.job, q.input_index)
                        = (k.dag_id, k.version, k.job, k.input_index)
    ) r
), rejected AS (
    SELECT * FROM jsonb_to_recordset(%(rejected)s::jsonb)
        AS x(outbox_id bigint, event_key text, dag_id uuid, version bigint, job text,
             input_index int)
), plan AS MATERIALIZED (
    -- one row per (event, consuming input), with the task's idempotency key and whether it is
    -- to be created (fresh): planned, not held, and a key the org does not have yet
    SELECT q.*,
           CASE WHEN q.planned AND NOT q.held
                THEN NOT EXISTS (SELECT 1 FROM tasks t
                                 WHERE t.org_id = q.org_id
                                   AND t.idempotency_key = q.idempotency_key)
                ELSE false END AS fresh
    FROM (
        SELECT gen_random_uuid() AS new_task_id, ev.outbox_id, ev.event_key, ev.seq,
               ev.event_type, ev.payload, r.*,
               r.key_prefix || ev.event_key || r.key_suffix AS idempotency_key
        FROM ev
        JOIN readers r ON (r.task_id, r.output, r.sink_dataset)
                        = (ev.task_id, ev.output, ev.sink_dataset)
        WHERE r.held OR NOT EXISTS (
            SELECT 1 FROM rejected x
            WHERE (x.outbox_id, x.event_key, x.dag_id, x.version, x.job, x.input_index)
                = (ev.outbox_id, ev.event_key, r.dag_id, r.version, r.job, r.input_index))
    ) q
), ins AS (
    INSERT INTO tasks (task_id, org_id, operator, payload, state, max_attempts, timeout_s,
                       idempotency_key, runtime, dag_id, dag_version, dag_job, read_datasets)
    SELECT f.new_task_id, f.org_id, f.operator,
           f.config || jsonb_build_object('event', jsonb_build_object(
               'producer_task_id', f.task_id::text, 'key', f.event_key, 'type', f.event_type,
               'payload', f.payload, 'output', f.output, 'input', f.input_index)),
           %(state)s, f.max_attempts, f.timeout_s, f.idempotency_key, f.runtime, f.dag_id,
           f.version, f.job, f.read_datasets
    FROM plan f
    WHERE f.fresh
    ORDER BY f.seq, f.dag_id, f.job, f.input_index
    -- a plain insert, not ON CONFLICT (a speculative insertion costs more per row): a
    -- concurrent creator of one of the keys (committed after the statement's snapshot) makes
    -- it fail with a unique violation, and the caller rolls the pass back (Conflict), as it
    -- would for any lost race; the next pass finds the key taken (not fresh)
    RETURNING task_id, runtime
), lineage AS (
    -- every fresh task is created or the statement fails: lineage needs no matching back
    INSERT INTO task_inputs (task_id, input_index, producer_task_id, event_key, event_seq,
                             dataset_uuid, dataset_version)
    SELECT f.new_task_id, f.input_index, f.task_id, f.event_key, f.seq, f.dataset_uuid,
           f.dataset_version
    FROM plan f
    WHERE f.fresh
), wakes AS (
    -- one wake-up row for the pass's worker tasks (the outbox publisher sends one queue
    -- message per task id it names), an invoke row per runtime: lambda task
    INSERT INTO outbox (topic, payload, available_at)
    SELECT %(wake_topic)s, jsonb_build_object('task_ids', jsonb_agg(n.task_id::text)), now()
    FROM ins n
    WHERE %(wake)s AND n.runtime <> 'lambda'
    HAVING count(*) > 0
    UNION ALL
    SELECT %(invoke_topic)s, jsonb_build_object('task_id', n.task_id::text), now()
    FROM ins n
    WHERE %(wake)s AND n.runtime = 'lambda'
), held AS (
    SELECT DISTINCT outbox_id FROM plan WHERE held
), hold AS (
    UPDATE outbox SET available_at = 'infinity'
    WHERE id IN (SELECT outbox_id FROM held)
    RETURNING id
), consumed AS (
    -- the claimed rows are still pending: the pass has held their row locks since the claim
    UPDATE outbox o
    SET state = d.state, tries = d.tries, published_at = now()
    FROM jsonb_to_recordset(%(sent)s::jsonb) AS d(from_tries int, state text, tries int)
    WHERE o.id = ANY(%(ids)s::bigint[]) AND o.tries = d.from_tries
      AND o.id NOT IN (SELECT outbox_id FROM held)
    RETURNING o.id
)
SELECT (SELECT count(*) FROM ins) AS created,
       (SELECT count(*) FROM claimed WHERE id IN (SELECT id FROM consumed)) AS consumed,
       (SELECT count(*) FROM claimed WHERE id IN (SELECT id FROM hold)) AS held,
       (SELECT count(*) FROM plan WHERE NOT planned) AS unplanned;

-- name: scheduled_jobs
-- Live jobs (dag_live_jobs) with a cron or interval trigger, the time their version was
-- deployed, and the database's now (schedules never read a worker's clock).
SELECT j.org_id::text AS org_id, j.dag_id::text AS dag_id, j.dag, j.version, j.job, j.operator,
       j.runtime, j.config::text AS config, j.timeout_s, j.max_attempts,
       j.triggers::text AS triggers, j.deployed_at, j.epoch, now() AS now
FROM dag_live_jobs j
WHERE j.triggers @> '[{"type": "cron"}]' OR j.triggers @> '[{"type": "interval"}]';

-- name: datasets_without_version
-- The datasets a DAG produces that its active pointer set does not point at yet (registered by
-- this deploy), with the active generation the first versions are cut over from.
SELECT d.dataset_uuid::text AS dataset_uuid, g.active_generation
FROM datasets d JOIN dags g ON g.dag_id = d.dag_id
WHERE d.dag_id = %(dag_id)s
  AND NOT EXISTS (SELECT 1 FROM dag_pointers p
                  WHERE p.dag_id = g.dag_id AND p.generation = g.active_generation
                    AND p.dataset_uuid = d.dataset_uuid)
ORDER BY d.name;

-- name: record_deploy
-- Record a deploy's activation (the new version with the pointer set now active); a rollback of
-- it restores the activation before it.
INSERT INTO dag_activations (dag_id, seq, version, generation, previous_seq, reason, created_by)
SELECT g.dag_id, coalesce(a.seq, 0) + 1, g.active_version, g.active_generation, a.seq, 'deploy',
       %(created_by)s
FROM dags g
CROSS JOIN LATERAL (SELECT max(seq) AS seq FROM dag_activations WHERE dag_id = g.dag_id) a
WHERE g.dag_id = %(dag_id)s;

-- name: lock_live_versions
-- The active version and the building staging (version, rebuilt jobs) of the DAGs tasks are
-- about to be created for, the DAG rows locked FOR SHARE so a deploy, cutover or rollback
-- (FOR UPDATE) waits for the creating transaction, or the creator sees its result.
SELECT g.dag_id::text AS dag_id, g.active_version, m.version AS staged_version,
       coalesce(m.rebuild, '{}') AS rebuild
FROM dags g
LEFT JOIN dag_rematerializations m ON m.dag_id = g.dag_id AND m.state = 'building'
WHERE g.dag_id = ANY(%(dag_ids)s::uuid[])
ORDER BY g.dag_id
FOR SHARE OF g;
