"""The config store: backfill jobs: requests, claims, progress per chunk, status."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

from psycopg2.extras import Json

from rosetta_dagster.core.config_store.base import StoreBase
from rosetta_dagster.core.config_store.records import (
    BACKFILL_SELECT,
    TERMINAL_BACKFILL_STATUSES,
    BackfillJob,
    BackfillStatus,
)
from rosetta_dagster.core.errors import ConfigStoreError


class BackfillRecords(StoreBase):
    # -- backfill jobs ---------------------------------------------------------------------

    def create_backfill_job(
        self, pipeline: str, table_name: str, filter: Sequence[dict[str, Any]] = ()
    ) -> BackfillJob:
        rows = self._query(
            """
            INSERT INTO backfill_jobs (pipeline_id, table_name, filter)
            SELECT id, %s, %s FROM pipelines WHERE name = %s
            RETURNING id
            """,
            (table_name, Json(list(filter)), pipeline),
        )
        if not rows:
            raise ConfigStoreError(f"Pipeline '{pipeline}' does not exist in the config store.")
        return self.get_backfill_job(rows[0]["id"])

    def find_backfill_job(self, job_id: int) -> BackfillJob | None:
        rows = self._query(BACKFILL_SELECT + " WHERE j.id = %s", (job_id,))
        return BackfillJob.from_row(rows[0]) if rows else None

    def get_backfill_job(self, job_id: int) -> BackfillJob:
        job = self.find_backfill_job(job_id)
        if job is None:
            raise ConfigStoreError(f"Backfill job {job_id} does not exist in the config store.")
        return job

    def cancel_backfill_job(self, job_id: int) -> BackfillJob:
        """CANCELLED unless already finished (then unchanged); a running copy notices it."""
        self._query(
            """
            UPDATE backfill_jobs SET status = 'CANCELLED', finished_at = now(), updated_at = now()
            WHERE id = %s AND status <> ALL(%s)
            """,
            (job_id, [s.value for s in TERMINAL_BACKFILL_STATUSES]),
        )
        return self.get_backfill_job(job_id)

    def list_backfill_jobs(
        self, *, pipeline: str | None = None, status: BackfillStatus | None = None
    ) -> list[BackfillJob]:
        rows = self._query(
            BACKFILL_SELECT
            + """
            WHERE (%(pipeline)s::text IS NULL OR p.name = %(pipeline)s)
              AND (%(status)s::text IS NULL OR j.status = %(status)s)
            ORDER BY j.id
            """,
            {"pipeline": pipeline, "status": None if status is None else BackfillStatus(status)},
        )
        return [BackfillJob.from_row(row) for row in rows]

    def claim_pending_backfill_jobs(
        self, limit: int = 10, pipelines: Collection[str] | None = None
    ) -> list[BackfillJob]:
        """Move up to ``limit`` PENDING jobs (of ``pipelines``, or any) to QUEUED and return them.

        ``FOR UPDATE SKIP LOCKED`` lets several claimers run at once without ever handing the
        same job to two of them.
        """
        names = None if pipelines is None else sorted(pipelines)
        rows = self._query(
            """
            WITH claimed AS (
                SELECT j.id FROM backfill_jobs j JOIN pipelines p ON p.id = j.pipeline_id
                WHERE j.status = 'PENDING' AND (%s::text[] IS NULL OR p.name = ANY(%s::text[]))
                ORDER BY j.created_at, j.id
                LIMIT %s
                FOR UPDATE OF j SKIP LOCKED
            )
            UPDATE backfill_jobs j SET status = 'QUEUED', updated_at = now()
            FROM claimed WHERE j.id = claimed.id
            RETURNING j.id
            """,
            (names, names, limit),
        )
        return [self.get_backfill_job(row["id"]) for row in sorted(rows, key=lambda r: r["id"])]

    def update_backfill_progress(
        self,
        job_id: int,
        *,
        count_record: int,
        total_record: int | None = None,
        resume_position: Any = None,
    ) -> None:
        self._query(
            """
            UPDATE backfill_jobs SET
                count_record = %s,
                total_record = coalesce(%s, total_record),
                resume_position = coalesce(%s, resume_position),
                updated_at = now()
            WHERE id = %s
            """,
            (
                count_record,
                total_record,
                None if resume_position is None else Json(resume_position),
                job_id,
            ),
        )

    def finished_backfill_job_ids(self, older_than_days: int) -> dict[str, list[int]]:
        """Ids of jobs that ended more than ``older_than_days`` ago, by pipeline."""
        rows = self._query(
            """
            SELECT p.name, array_agg(j.id ORDER BY j.id) AS ids
            FROM backfill_jobs j JOIN pipelines p ON p.id = j.pipeline_id
            WHERE j.status = ANY(%s) AND j.finished_at < now() - make_interval(days => %s)
            GROUP BY p.name
            """,
            ([s.value for s in TERMINAL_BACKFILL_STATUSES], older_than_days),
        )
        return {row["name"]: list(row["ids"]) for row in rows}

    def retry_backfill_job(self, job_id: int) -> BackfillJob:
        """A FAILED or CANCELLED job back to PENDING; it resumes from its last applied chunk."""
        rows = self._query(
            "UPDATE backfill_jobs SET status = 'PENDING', finished_at = NULL, updated_at = now() "
            "WHERE id = %s AND status IN ('FAILED', 'CANCELLED') RETURNING id",
            (job_id,),
        )
        if not rows:
            job = self.get_backfill_job(job_id)
            raise ConfigStoreError(
                f"Backfill job {job_id} is {job.status.value}; only FAILED or CANCELLED jobs retry."
            )
        return self.get_backfill_job(job_id)

    def record_backfill_chunk(
        self, job_id: int, chunk: int, *, last_key: Any, rows: int, inserted: int = 0,
        updated: int = 0, deleted: int = 0,
    ) -> None:
        """The stream applied ``chunk`` (``rows`` read from the source; what it changed on the
        destinations): count them and move the resume point, once."""
        self._query(
            """
            UPDATE backfill_jobs SET
                count_record = count_record + %(rows)s,
                rows_inserted = rows_inserted + %(inserted)s,
                rows_updated = rows_updated + %(updated)s,
                rows_deleted = rows_deleted + %(deleted)s,
                resume_position = jsonb_build_object('chunk', %(chunk)s::int,
                                                   'last_key', %(last_key)s::jsonb),
                updated_at = now()
            WHERE id = %(id)s AND coalesce((resume_position ->> 'chunk')::int, 0) < %(chunk)s
            """,
            {"rows": rows, "chunk": chunk, "last_key": Json(last_key), "id": job_id,
             "inserted": inserted, "updated": updated, "deleted": deleted},
        )

    def request_backfill_chunk_redo(self, job_id: int, chunk: int) -> None:
        self._query(
            """
            UPDATE backfill_jobs SET
                resume_position = coalesce(resume_position, '{}'::jsonb)
                                  || jsonb_build_object('redo', %s::int),
                updated_at = now()
            WHERE id = %s
            """,
            (chunk, job_id),
        )

    def fail_abandoned_backfill_job(self, job_id: int, attempts: int, error: str) -> bool:
        """FAILED with ``error`` if the job is still EXECUTING attempt ``attempts``."""
        return bool(self._query(
            "UPDATE backfill_jobs SET status = 'FAILED', error = %s, finished_at = now(), "
            "updated_at = now() WHERE id = %s AND status = 'EXECUTING' AND attempts = %s "
            "RETURNING id", (error, job_id, attempts)))

    def set_backfill_status(
        self,
        job_id: int,
        status: BackfillStatus,
        *,
        error: str | None = None,
        run_id: str | None = None,
    ) -> BackfillJob:
        status = BackfillStatus(status)
        rows = self._query(
            """
            UPDATE backfill_jobs SET
                status = %(status)s,
                error = %(error)s,
                run_id = coalesce(%(run_id)s, run_id),
                attempts = attempts + CASE WHEN %(status)s = 'EXECUTING' THEN 1 ELSE 0 END,
                started_at = CASE WHEN %(status)s = 'EXECUTING' THEN now() ELSE started_at END,
                finished_at = CASE WHEN %(status)s = ANY(%(terminal)s) THEN now() ELSE NULL END,
                updated_at = now()
            WHERE id = %(id)s
            RETURNING id
            """,
            {
                "status": status.value,
                "error": error,
                "run_id": run_id,
                "terminal": [s.value for s in TERMINAL_BACKFILL_STATUSES],
                "id": job_id,
            },
        )
        if not rows:
            raise ConfigStoreError(f"Backfill job {job_id} does not exist in the config store.")
        return self.get_backfill_job(job_id)
