-- Alert delivery (trace_lite.delivery): webhook destinations, the one shared alert_deliveries
-- table the Delivery Service leases from (SKIP LOCKED, fenced on delivery_id + attempt +
-- lease_token like tasks), and one row per attempt. States are trace_core.delivery's.
-- Safe to run twice.

CREATE TABLE IF NOT EXISTS alert_destinations (
    destination_id   uuid PRIMARY KEY,
    org_id           uuid NOT NULL REFERENCES orgs (org_id),
    name             text NOT NULL CHECK (name ~ '^[a-z0-9][a-z0-9_-]{0,62}$'),
    -- the payload shape sent: a generic signed webhook, Slack, or PagerDuty Events v2
    kind             text NOT NULL CHECK (kind IN ('webhook', 'slack', 'pagerduty')),
    url              text NOT NULL CHECK (length(url) <= 2048),
    -- the SecretStore name of the signing secret (whsec_...): trace/org/{org_id}/...
    secret_name      text NOT NULL,
    enabled          boolean NOT NULL DEFAULT true,
    disabled_reason  text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    UNIQUE (org_id, name)
);

CREATE TABLE IF NOT EXISTS alert_deliveries (
    delivery_id        uuid PRIMARY KEY,
    org_id             uuid NOT NULL REFERENCES orgs (org_id),
    destination_id     uuid NOT NULL REFERENCES alert_destinations (destination_id),
    -- trace_core.delivery.delivery_key(alert_key, route, destination_id): routing the same
    -- event twice yields this same row
    delivery_key       text NOT NULL UNIQUE CHECK (delivery_key ~ '^[0-9a-f]{64}$'),
    alert_key          text NOT NULL,
    route              text NOT NULL,
    event_time         timestamptz NOT NULL,
    payload            jsonb NOT NULL,
    state              text NOT NULL
                       CHECK (state IN ('due','in_flight','sent','failed','suppressed','disabled')),
    -- the current attempt; 0 before the first lease
    attempt            int NOT NULL DEFAULT 0 CHECK (attempt >= 0),
    lease_token        uuid,
    lease_expires_at   timestamptz,
    available_at       timestamptz NOT NULL DEFAULT now(),
    last_error         text,
    last_status        int,
    suppressed_reason  text,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    sent_at            timestamptz,
    CHECK ((state = 'in_flight') = (lease_expires_at IS NOT NULL))
);

CREATE INDEX IF NOT EXISTS alert_deliveries_due_idx
    ON alert_deliveries (available_at) WHERE state = 'due';
CREATE INDEX IF NOT EXISTS alert_deliveries_in_flight_idx
    ON alert_deliveries (lease_expires_at) WHERE state = 'in_flight';
CREATE INDEX IF NOT EXISTS alert_deliveries_destination_idx
    ON alert_deliveries (destination_id, state);

CREATE TABLE IF NOT EXISTS delivery_attempts (
    delivery_id   uuid NOT NULL REFERENCES alert_deliveries (delivery_id),
    attempt       int NOT NULL CHECK (attempt >= 1),
    lease_token   uuid NOT NULL,
    sender        text NOT NULL,
    started_at    timestamptz NOT NULL DEFAULT now(),
    finished_at   timestamptz,
    -- 'in_flight' until the attempt ends, then the trace_core.delivery event that ended it
    outcome       text NOT NULL DEFAULT 'in_flight'
                  CHECK (outcome IN ('in_flight','succeed','fail','rate_limited','gone','refuse',
                                     'expire')),
    status_code   int,
    latency_ms    int,
    error         text,
    PRIMARY KEY (delivery_id, attempt)
);
