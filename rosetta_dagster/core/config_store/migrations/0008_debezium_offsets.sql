-- offset_store: config_db (core/capture/debezium/offset_table.py). Debezium's JDBC offset store
-- writes debezium_offsets itself, with its own column layout (see JdbcOffsetBackingStoreConfig);
-- one row per pipeline, keyed by the same JSON key as the offsets file.
CREATE TABLE IF NOT EXISTS debezium_offsets (
    id                varchar(36) PRIMARY KEY,
    offset_key        varchar(1255),
    offset_val        varchar(1255),
    record_insert_ts  timestamptz NOT NULL,  -- Debezium binds a java.sql.Timestamp
    record_insert_seq integer NOT NULL
);
CREATE INDEX IF NOT EXISTS debezium_offsets_key ON debezium_offsets (offset_key);

-- The tables a Debezium stream covers, with their load fences (the offsets file's
-- <pipeline>.loads.json), for the same pipelines.
CREATE TABLE stream_load_states (
    pipeline   text PRIMARY KEY,
    document   jsonb NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
