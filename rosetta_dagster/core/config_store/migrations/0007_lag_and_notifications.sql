-- Replication lag measured on the source (core/lag.py) and alerts sent to people (core/notify.py).

-- Where the stream stands (newest applied position, reported with its heartbeat) and the latest
-- lag measurement (WAL monitor sensor, health checks).
ALTER TABLE pipeline_metadata
    ADD COLUMN applied_lsn     pg_lsn,
    ADD COLUMN lag_seconds     double precision,
    ADD COLUMN lag_bytes       bigint,
    ADD COLUMN lag_note        text,
    ADD COLUMN lag_measured_at timestamptz;

-- Every delivery attempt of a notification, successful or not. ``dedupe_key`` names one
-- notification (channel, condition, transition, when it was seen): a delivered one is never
-- sent again, even when a daemon restart replays the tick that sent it.
CREATE TABLE notification_log (
    id          bigserial PRIMARY KEY,
    channel     text NOT NULL,
    dedupe_key  text NOT NULL,
    alert_key   text NOT NULL,
    pipeline    text,
    transition  text NOT NULL,        -- FIRING, REPEAT, RESOLVED, EVENT, TEST
    severity    text NOT NULL,
    text        text NOT NULL,
    attempt     int NOT NULL,
    delivered   boolean NOT NULL,
    http_status int,
    error       text,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX notification_log_dedupe ON notification_log (dedupe_key) WHERE delivered;
CREATE INDEX notification_log_created ON notification_log (created_at DESC);
