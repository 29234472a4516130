-- Delivery wake-ups (trace_lite.delivery_wakeups): a statement that leaves deliveries due now
-- -- the route's insert, an operator's retry, an attempt due again at once (the schedule's
-- first step is 0 s), a lapsed lease made due again -- sends NOTIFY trace_delivery, delivered
-- at its commit, so an idle Delivery Service leases them at once instead of at its next poll
-- (the poll stays, as the fallback for later available_at and a lost listener). One
-- notification per statement, none for suppressed, disabled or later-due rows.
-- Safe to run twice.

CREATE OR REPLACE FUNCTION trace_delivery_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM due_now WHERE state = 'due' AND available_at <= now()) THEN
        PERFORM pg_notify('trace_delivery', '');
    END IF;
    RETURN NULL;
END $$;

DROP TRIGGER IF EXISTS alert_deliveries_notify_insert ON alert_deliveries;
CREATE TRIGGER alert_deliveries_notify_insert AFTER INSERT ON alert_deliveries
    REFERENCING NEW TABLE AS due_now
    FOR EACH STATEMENT EXECUTE FUNCTION trace_delivery_notify();

DROP TRIGGER IF EXISTS alert_deliveries_notify_update ON alert_deliveries;
CREATE TRIGGER alert_deliveries_notify_update AFTER UPDATE ON alert_deliveries
    REFERENCING NEW TABLE AS due_now
    FOR EACH STATEMENT EXECUTE FUNCTION trace_delivery_notify();
