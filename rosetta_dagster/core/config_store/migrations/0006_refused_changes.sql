-- Changes a destination refused (constraint, value, permission): see core/apply/errors.py.

-- The change a pipeline stopped on (on_apply_error: stop), cleared once it streams past it.
ALTER TABLE pipeline_metadata ADD COLUMN last_apply_error jsonb;

-- `rosetta pipeline skip`: one refused change to drop, confirmed by a person.
CREATE TABLE apply_skips (
    id           bigserial PRIMARY KEY,
    pipeline_id  bigint NOT NULL REFERENCES pipelines (id) ON DELETE CASCADE,
    destination  text NOT NULL,
    table_name   text NOT NULL,
    key          jsonb NOT NULL,       -- {column: value as text}
    operation    text NOT NULL,
    position     text NOT NULL,        -- source LSN of the change
    requested_by text NOT NULL,
    requested_at timestamptz NOT NULL DEFAULT now(),
    skipped_at   timestamptz           -- when the stream dropped it
);

-- on_apply_error: park. Whole events, in stream order (id), never trimmed automatically.
CREATE TABLE parked_events (
    id                 bigserial PRIMARY KEY,
    pipeline_id        bigint NOT NULL REFERENCES pipelines (id) ON DELETE CASCADE,
    destination        text NOT NULL,
    table_name         text NOT NULL,
    key                jsonb NOT NULL,
    operation          text NOT NULL,
    position           text,
    event              jsonb NOT NULL,   -- the change as the stream had it
    error              text NOT NULL,    -- the refusal (or: parked behind an earlier change)
    sqlstate           text,
    attempts           integer NOT NULL DEFAULT 1,
    retry_requested_at timestamptz,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX parked_events_key_idx ON parked_events (pipeline_id, destination, table_name, key, id);
