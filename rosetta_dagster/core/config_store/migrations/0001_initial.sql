-- Runtime state of Rosetta. All timestamps are timestamptz; sessions use TimeZone=UTC.

CREATE TABLE pipelines (
    id           bigserial PRIMARY KEY,
    name         text NOT NULL UNIQUE,
    source       text NOT NULL,
    destinations jsonb NOT NULL DEFAULT '[]'::jsonb,
    tables       jsonb NOT NULL DEFAULT '[]'::jsonb,
    -- Desired status, changed at run time by users; the supervisor makes reality follow it.
    status       text NOT NULL DEFAULT 'PAUSE' CHECK (status IN ('START', 'PAUSE')),
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);

-- Observed state of a pipeline's streaming run.
CREATE TABLE pipeline_metadata (
    pipeline_id   bigint PRIMARY KEY REFERENCES pipelines (id) ON DELETE CASCADE,
    state         text NOT NULL DEFAULT 'PAUSED' CHECK (state IN ('RUNNING', 'PAUSED', 'ERROR')),
    last_error    text,
    last_error_at timestamptz,
    last_start_at timestamptz,
    heartbeat_at  timestamptz,
    run_id        text,
    updated_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE backfill_jobs (
    id              bigserial PRIMARY KEY,
    pipeline_id     bigint NOT NULL REFERENCES pipelines (id) ON DELETE CASCADE,
    table_name      text NOT NULL,
    -- Structured filter: a list of {"column", "operator", "value"} objects, never raw SQL.
    filter          jsonb NOT NULL DEFAULT '[]'::jsonb,
    status          text NOT NULL DEFAULT 'PENDING' CHECK (
        status IN ('PENDING', 'QUEUED', 'EXECUTING', 'COMPLETED', 'FAILED', 'CANCELLED')
    ),
    count_record    bigint NOT NULL DEFAULT 0 CHECK (count_record >= 0),
    total_record    bigint CHECK (total_record >= 0),
    resume_position jsonb,
    attempts        integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    error           text,
    run_id          text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    started_at      timestamptz,
    finished_at     timestamptz
);
CREATE INDEX backfill_jobs_pending_idx ON backfill_jobs (created_at, id) WHERE status = 'PENDING';
CREATE INDEX backfill_jobs_pipeline_idx ON backfill_jobs (pipeline_id, created_at);

-- Records applied per batch, per destination table.
CREATE TABLE data_flow_record_monitoring (
    id           bigserial PRIMARY KEY,
    pipeline_id  bigint NOT NULL REFERENCES pipelines (id) ON DELETE CASCADE,
    destination  text NOT NULL,
    table_name   text NOT NULL,
    record_count bigint NOT NULL CHECK (record_count >= 0),
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX data_flow_record_monitoring_pipeline_idx
    ON data_flow_record_monitoring (pipeline_id, created_at);

-- Readings of the WAL monitor, one row per source replication slot per check.
CREATE TABLE wal_monitor (
    id                  bigserial PRIMARY KEY,
    source              text NOT NULL,
    slot_name           text NOT NULL,
    pipeline_id         bigint REFERENCES pipelines (id) ON DELETE SET NULL,
    current_lsn         pg_lsn,
    confirmed_flush_lsn pg_lsn,
    retained_wal_bytes  bigint,
    lag_bytes           bigint,
    status              text NOT NULL,
    checked_at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX wal_monitor_slot_idx ON wal_monitor (source, slot_name, checked_at DESC);
