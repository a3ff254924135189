-- Every failure of a pipeline's stream (its state set to ERROR), kept for a day: the
-- stream_health check reports the recent ones as context once the stream runs again.
CREATE TABLE pipeline_failures (
    id          bigserial PRIMARY KEY,
    pipeline_id bigint NOT NULL REFERENCES pipelines (id) ON DELETE CASCADE,
    error       text,
    failed_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX pipeline_failures_recent ON pipeline_failures (pipeline_id, failed_at DESC);
