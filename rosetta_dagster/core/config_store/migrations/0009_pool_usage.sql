-- How busy each connection pool of each Rosetta process is (streams, sensors, the API), so the
-- checklist's pool thresholds (8 and 9 of 10) judge one pool, not every session on config_db.
CREATE TABLE pool_usage (
    process     text NOT NULL,        -- host:pid of the reporting process
    pool        text NOT NULL,        -- the pool's label: config_db, destination <name>
    owner       text NOT NULL,        -- what uses it (its application_name)
    max_conn    integer NOT NULL,
    in_use      integer NOT NULL,
    peak_in_use integer NOT NULL,     -- most in use at once since peak_since
    peak_since  timestamptz NOT NULL DEFAULT now(),
    reported_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (process, pool, owner)
);
