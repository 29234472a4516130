-- Alert destinations managed over HTTP (servers/trace_servers/alerts_api.py): a deleted
-- destination is kept (its deliveries and attempts still reference it) and marked deleted_at;
-- its name is free again, so the one-name-per-org rule holds among live destinations only.
-- Safe to run twice.

ALTER TABLE alert_destinations ADD COLUMN IF NOT EXISTS deleted_at timestamptz;

ALTER TABLE alert_destinations DROP CONSTRAINT IF EXISTS alert_destinations_org_id_name_key;

CREATE UNIQUE INDEX IF NOT EXISTS alert_destinations_live_name_idx
    ON alert_destinations (org_id, name) WHERE deleted_at IS NULL;
