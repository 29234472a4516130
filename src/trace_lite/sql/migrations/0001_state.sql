-- Trace state: orgs, jobs, tasks, attempts, events, buffer batches, outbox.
-- Timestamps come from the database's now() only; worker clocks are never trusted.

CREATE TABLE IF NOT EXISTS orgs (
    org_id      uuid PRIMARY KEY,
    name        text NOT NULL UNIQUE,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS jobs (
    job_id        uuid PRIMARY KEY,
    org_id        uuid NOT NULL REFERENCES orgs (org_id),
    name          text NOT NULL,
    operator      text NOT NULL,
    config        jsonb NOT NULL DEFAULT '{}'::jsonb,
    max_attempts  int  NOT NULL DEFAULT 5 CHECK (max_attempts BETWEEN 1 AND 100),
    timeout_s     int  NOT NULL DEFAULT 60 CHECK (timeout_s BETWEEN 1 AND 900),
    created_at    timestamptz NOT NULL DEFAULT now(),
    UNIQUE (org_id, name)
);

CREATE TABLE IF NOT EXISTS tasks (
    task_id           uuid PRIMARY KEY,
    org_id            uuid NOT NULL REFERENCES orgs (org_id),
    job_id            uuid REFERENCES jobs (job_id),
    operator          text NOT NULL,
    payload           jsonb NOT NULL DEFAULT '{}'::jsonb,
    state             text NOT NULL
                      CHECK (state IN ('pending','queued','running','completed','failed','canceled')),
    -- the current attempt; 0 before the first claim
    attempt           int  NOT NULL DEFAULT 0,
    lease_token       uuid,
    lease_expires_at  timestamptz,
    max_attempts      int  NOT NULL DEFAULT 5 CHECK (max_attempts BETWEEN 1 AND 100),
    timeout_s         int  NOT NULL DEFAULT 60 CHECK (timeout_s BETWEEN 1 AND 900),
    available_at      timestamptz NOT NULL DEFAULT now(),
    idempotency_key   text,
    result            jsonb,
    error             jsonb,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    finished_at       timestamptz,
    UNIQUE (org_id, idempotency_key)
);

-- claimers and the reaper scan only live rows
CREATE INDEX IF NOT EXISTS tasks_queued_idx ON tasks (available_at) WHERE state = 'queued';
CREATE INDEX IF NOT EXISTS tasks_pending_idx ON tasks (available_at) WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS tasks_running_idx ON tasks (lease_expires_at) WHERE state = 'running';

CREATE TABLE IF NOT EXISTS task_attempts (
    task_id            uuid NOT NULL REFERENCES tasks (task_id),
    attempt            int  NOT NULL,
    lease_token        uuid NOT NULL,
    worker_id          text NOT NULL,
    started_at         timestamptz NOT NULL DEFAULT now(),
    heartbeat_at       timestamptz,
    lease_expires_at   timestamptz NOT NULL,
    finished_at        timestamptz,
    outcome            text NOT NULL DEFAULT 'running'
                       CHECK (outcome IN ('running','succeeded','failed','timed_out','canceled')),
    completion_digest  text,
    error              jsonb,
    PRIMARY KEY (task_id, attempt)
);

-- Events a task emits. The producer-chosen key makes re-emission by a retried attempt a no-op:
-- dedupe by (producer task, key).
CREATE TABLE IF NOT EXISTS task_events (
    seq         bigserial,
    task_id     uuid NOT NULL REFERENCES tasks (task_id),
    event_key   text NOT NULL,
    attempt     int  NOT NULL,
    event_type  text NOT NULL,
    payload     jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (task_id, event_key)
);

-- Buffer batch pointers: an object holding rows for a buffered dataset, published by an attempt.
CREATE TABLE IF NOT EXISTS buffer_batches (
    task_id     uuid NOT NULL REFERENCES tasks (task_id),
    batch_key   text NOT NULL,
    attempt     int  NOT NULL,
    dataset     text NOT NULL,
    object_key  text NOT NULL,
    row_count   int  NOT NULL,
    byte_size   bigint NOT NULL,
    sha256      text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (task_id, batch_key)
);

CREATE TABLE IF NOT EXISTS outbox (
    id            bigserial PRIMARY KEY,
    topic         text NOT NULL,
    payload       jsonb NOT NULL,
    state         text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending','published','dead')),
    tries         int  NOT NULL DEFAULT 0,
    available_at  timestamptz NOT NULL DEFAULT now(),
    created_at    timestamptz NOT NULL DEFAULT now(),
    published_at  timestamptz,
    last_error    text
);

CREATE INDEX IF NOT EXISTS outbox_due_idx ON outbox (available_at, id) WHERE state = 'pending';
