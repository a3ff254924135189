-- What each backfill job changed on the destinations (summed over them): rows it inserted,
-- rewrote because they differed, and deleted because the source no longer has them.
ALTER TABLE backfill_jobs
    ADD COLUMN rows_inserted bigint NOT NULL DEFAULT 0,
    ADD COLUMN rows_updated  bigint NOT NULL DEFAULT 0,
    ADD COLUMN rows_deleted  bigint NOT NULL DEFAULT 0;
