-- Operating the streams: offset cleanup history and a fuller WAL monitor reading.

-- Every deletion of a Debezium offset file, and why (the only reason: its slot is gone).
CREATE TABLE offset_cleanups (
    id          bigserial PRIMARY KEY,
    pipeline_id bigint REFERENCES pipelines (id) ON DELETE CASCADE,
    offset_file text NOT NULL,
    slot_name   text NOT NULL,
    reason      text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX offset_cleanups_created_idx ON offset_cleanups (created_at DESC);

-- status holds the monitor's verdict: OK, WARNING, CRITICAL or MISSING (no slot).
ALTER TABLE wal_monitor
    ADD COLUMN active boolean,
    ADD COLUMN wal_status text;
