-- Connection-pool health events reported by Rosetta's processes (streams, sensors, API), for
-- the checklist's "closed connection" and pool-initialisation alerts.
CREATE TABLE pool_events (
    id         bigserial PRIMARY KEY,
    process    text NOT NULL,   -- host:pid of the reporting process
    pool       text NOT NULL,   -- the pool's label, e.g. config_db
    kind       text NOT NULL CHECK (
        kind IN ('init_retried', 'dead_connection', 'closed_connection', 'checkout_timeout')
    ),
    count      integer NOT NULL CHECK (count > 0),
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX pool_events_created_idx ON pool_events (created_at DESC);
