-- The source time of the newest change or heartbeat message a pipeline applied: lag is
-- now() - source_position_at, which heartbeat messages keep meaningful on an idle source.
ALTER TABLE pipeline_metadata ADD COLUMN source_position_at timestamptz;
