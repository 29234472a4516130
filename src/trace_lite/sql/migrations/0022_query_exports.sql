-- Batch exports of the Query Service (trace_lite.query.exports): one row per export, its state
-- moved by compare-and-swap from 'running' to exactly one ending. The result object lives under
-- the org's results prefix (org/{org_id}/results/); retention 7 days. Safe to run twice.
CREATE TABLE IF NOT EXISTS query_exports (
    export_id     uuid PRIMARY KEY,
    org_id        uuid NOT NULL REFERENCES orgs (org_id),
    -- the user who asked; only they see or cancel it
    requested_by  text NOT NULL CHECK (length(requested_by) BETWEEN 1 AND 300),
    sql           text NOT NULL CHECK (length(sql) BETWEEN 1 AND 100000),
    format        text NOT NULL CHECK (format IN ('parquet', 'csv')),
    state         text NOT NULL DEFAULT 'running'
                  CHECK (state IN ('running', 'succeeded', 'failed', 'canceled')),
    -- the row cap asked for (itself capped by the service's export limit)
    max_rows      bigint NOT NULL CHECK (max_rows >= 0),
    rows          bigint CHECK (rows >= 0),
    bytes         bigint CHECK (bytes >= 0),
    truncated     boolean,
    object_key    text,
    -- dataset name -> the version the export read
    versions      jsonb,
    -- {error, message} of a failed export
    error         jsonb,
    created_at    timestamptz NOT NULL DEFAULT now(),
    -- a 'running' export past this (its server died) is failed as abandoned when read
    deadline_at   timestamptz NOT NULL,
    finished_at   timestamptz,
    expires_at    timestamptz NOT NULL,
    CHECK ((state = 'running') = (finished_at IS NULL)),
    CHECK (state <> 'succeeded' OR (object_key IS NOT NULL AND rows IS NOT NULL))
);

CREATE INDEX IF NOT EXISTS query_exports_expiry ON query_exports (expires_at);
CREATE INDEX IF NOT EXISTS query_exports_running ON query_exports (deadline_at)
    WHERE state = 'running';
