"""Typed access to the config store tables. Every method borrows one pooled connection."""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from psycopg2.extras import Json, RealDictCursor

from rosetta_dagster.core.config_store.migrations import (
    Migration,
    apply_migrations,
    current_version,
)
from rosetta_dagster.core.errors import ConfigStoreError
from rosetta_dagster.core.lag import LagReading
from rosetta_dagster.core.pipeline_config import PipelineDefinition
from rosetta_dagster.core.pool import ResilientConnectionPool

POOL_PEAK_WINDOW_S = 300  # a pool's peak in use is kept this long
POOL_REPORT_FRESH_S = 300  # a pool not reported for this long belongs to a process that ended


class PipelineStatus(StrEnum):
    """Desired status, set by users."""

    START = "START"
    PAUSE = "PAUSE"


class PipelineState(StrEnum):
    """Observed state of the streaming run."""

    RUNNING = "RUNNING"
    PAUSED = "PAUSED"
    ERROR = "ERROR"


class BackfillStatus(StrEnum):
    PENDING = "PENDING"
    QUEUED = "QUEUED"
    EXECUTING = "EXECUTING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


@dataclass(frozen=True)
class Pipeline:
    id: int
    name: str
    source: str
    destinations: list[str]
    tables: list[str]
    status: PipelineStatus
    state: PipelineState
    last_error: str | None
    last_error_at: datetime | None
    last_start_at: datetime | None
    heartbeat_at: datetime | None
    created_at: datetime
    updated_at: datetime
    run_id: str | None = None  # the streaming run that last reported state or a heartbeat
    source_position_at: datetime | None = None  # source time of the newest change applied
    # The refused change the pipeline stopped on (core.apply.errors.RefusedChange.as_dict()).
    last_apply_error: dict[str, Any] | None = None
    applied_lsn: int | None = None  # newest source position applied everywhere (heartbeat)
    lag: LagReading | None = None  # the latest measurement (core.lag)
    lag_measured_at: datetime | None = None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Pipeline:
        return cls(
            id=row["id"],
            name=row["name"],
            source=row["source"],
            destinations=list(row["destinations"]),
            tables=list(row["tables"]),
            status=PipelineStatus(row["status"]),
            state=PipelineState(row["state"] or PipelineState.PAUSED),
            last_error=row["last_error"],
            last_error_at=row["last_error_at"],
            last_start_at=row["last_start_at"],
            heartbeat_at=row["heartbeat_at"],
            created_at=row["created_at"],
            updated_at=row["updated_at"],
            run_id=row["run_id"],
            source_position_at=row["source_position_at"],
            last_apply_error=row.get("last_apply_error"),
            applied_lsn=None if row.get("applied_lsn") is None else int(row["applied_lsn"]),
            lag=(LagReading(row["lag_seconds"], row["lag_bytes"], note=row["lag_note"])
                 if row.get("lag_measured_at") else None),
            lag_measured_at=row.get("lag_measured_at"),
        )


@dataclass(frozen=True)
class BackfillJob:
    id: int
    pipeline: str
    table_name: str
    filter: list[dict[str, Any]]
    status: BackfillStatus
    count_record: int
    total_record: int | None
    resume_position: Any
    attempts: int
    error: str | None
    run_id: str | None
    created_at: datetime
    updated_at: datetime
    # Destination rows the job inserted, rewrote (they differed) and deleted (not in the source).
    rows_inserted: int = 0
    rows_updated: int = 0
    rows_deleted: int = 0

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> BackfillJob:
        return cls(
            id=row["id"],
            pipeline=row["pipeline"],
            table_name=row["table_name"],
            filter=list(row["filter"]),
            status=BackfillStatus(row["status"]),
            count_record=row["count_record"],
            total_record=row["total_record"],
            resume_position=row["resume_position"],
            attempts=row["attempts"],
            error=row["error"],
            run_id=row["run_id"],
            created_at=row["created_at"],
            updated_at=row["updated_at"],
            rows_inserted=row["rows_inserted"],
            rows_updated=row["rows_updated"],
            rows_deleted=row["rows_deleted"],
        )


_PIPELINE_SELECT = """
    SELECT p.id, p.name, p.source, p.destinations, p.tables, p.status, p.created_at,
           p.updated_at, m.state, m.last_error, m.last_error_at, m.last_start_at, m.heartbeat_at,
           m.run_id, m.source_position_at, m.last_apply_error,
           m.applied_lsn - '0/0'::pg_lsn AS applied_lsn, m.lag_seconds, m.lag_bytes, m.lag_note,
           m.lag_measured_at
    FROM pipelines p LEFT JOIN pipeline_metadata m ON m.pipeline_id = p.id
"""

@dataclass(frozen=True)
class ParkedRow:
    """A change to park: where it goes, its key, the change and why."""

    destination: str
    table_name: str
    key: dict[str, Any]
    operation: str
    position: str | None
    event: dict[str, Any]
    error: str
    sqlstate: str | None


@dataclass(frozen=True)
class ParkedEvent(ParkedRow):
    """A parked change as stored: a change parked because a destination refused it (or an
    earlier change of its key)."""

    id: int
    pipeline: str
    attempts: int
    retry_requested_at: datetime | None
    created_at: datetime

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> ParkedEvent:
        return cls(**{name: row[name] for name in cls.__dataclass_fields__})


_PARKED_SELECT = """
    SELECT e.*, p.name AS pipeline FROM parked_events e JOIN pipelines p ON p.id = e.pipeline_id
"""

_BACKFILL_SELECT = """
    SELECT j.*, p.name AS pipeline
    FROM backfill_jobs j JOIN pipelines p ON p.id = j.pipeline_id
"""

_TERMINAL_BACKFILL_STATUSES = (
    BackfillStatus.COMPLETED,
    BackfillStatus.FAILED,
    BackfillStatus.CANCELLED,
)


class ConfigStore:
    """Repository over the config store, backed by a :class:`ResilientConnectionPool`."""

    def __init__(self, pool: ResilientConnectionPool) -> None:
        self.pool = pool

    def _query(self, query: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        with self.pool.connection() as conn, conn.cursor(cursor_factory=RealDictCursor) as cur:
            cur.execute(query, params)
            return [dict(row) for row in cur.fetchall()] if cur.description else []

    # -- schema ----------------------------------------------------------------------------

    def upgrade(self) -> list[Migration]:
        with self.pool.connection() as conn:
            return apply_migrations(conn)

    def schema_version(self) -> int:
        with self.pool.connection() as conn:
            return current_version(conn)

    # -- pipelines -------------------------------------------------------------------------

    def upsert_pipeline(
        self,
        name: str,
        *,
        source: str,
        destinations: Sequence[str],
        tables: Sequence[str],
        status: PipelineStatus | None = None,
    ) -> Pipeline:
        """Create or update a pipeline's declaration; ``status`` is kept unless given."""
        self._query(
            """
            WITH upserted AS (
                INSERT INTO pipelines (name, source, destinations, tables, status)
                VALUES (%(name)s, %(source)s, %(destinations)s, %(tables)s,
                        coalesce(%(status)s, 'PAUSE'))
                ON CONFLICT (name) DO UPDATE SET
                    source = EXCLUDED.source,
                    destinations = EXCLUDED.destinations,
                    tables = EXCLUDED.tables,
                    status = coalesce(%(status)s, pipelines.status),
                    updated_at = now()
                RETURNING id
            )
            INSERT INTO pipeline_metadata (pipeline_id) SELECT id FROM upserted
            ON CONFLICT (pipeline_id) DO NOTHING
            """,
            {
                "name": name,
                "source": source,
                "destinations": Json(list(destinations)),
                "tables": Json(list(tables)),
                "status": None if status is None else PipelineStatus(status).value,
            },
        )
        return self.get_pipeline(name)

    def sync_pipeline(self, pipeline: PipelineDefinition) -> Pipeline:
        """Write a declared pipeline (from rosetta.yaml), keeping its desired status."""
        return self.upsert_pipeline(
            pipeline.name,
            source=pipeline.source.name,
            destinations=[d.name for d in pipeline.destinations],
            tables=[t.qualified for t in pipeline.tables],
        )

    def find_pipeline(self, name: str) -> Pipeline | None:
        rows = self._query(_PIPELINE_SELECT + " WHERE p.name = %s", (name,))
        return Pipeline.from_row(rows[0]) if rows else None

    def get_pipeline(self, name: str) -> Pipeline:
        pipeline = self.find_pipeline(name)
        if pipeline is None:
            raise ConfigStoreError(f"Pipeline '{name}' does not exist in the config store.")
        return pipeline

    def list_pipelines(self) -> list[Pipeline]:
        return [Pipeline.from_row(row) for row in self._query(_PIPELINE_SELECT + " ORDER BY p.name")]

    def set_pipeline_status(self, name: str, status: PipelineStatus | str) -> Pipeline:
        try:
            desired = PipelineStatus(str(status).upper())
        except ValueError:
            raise ConfigStoreError(
                f"Pipeline status must be START or PAUSE, got '{status}'."
            ) from None
        rows = self._query(
            "UPDATE pipelines SET status = %s, updated_at = now() WHERE name = %s RETURNING id",
            (desired.value, name),
        )
        if not rows:
            raise ConfigStoreError(f"Pipeline '{name}' does not exist in the config store.")
        return self.get_pipeline(name)

    def record_pipeline_state(
        self,
        name: str,
        state: PipelineState,
        *,
        error: str | None = None,
        run_id: str | None = None,
    ) -> None:
        """Record the observed state; RUNNING also stamps last_start_at and the heartbeat."""
        state = PipelineState(state)
        rows = self._query(
            """
            UPDATE pipeline_metadata m SET
                state = %(state)s,
                last_error = CASE WHEN %(state)s = 'ERROR' THEN %(error)s ELSE m.last_error END,
                last_error_at = CASE WHEN %(state)s = 'ERROR' THEN now() ELSE m.last_error_at END,
                last_start_at = CASE WHEN %(state)s = 'RUNNING' THEN now() ELSE m.last_start_at END,
                heartbeat_at = CASE WHEN %(state)s = 'RUNNING' THEN now() ELSE m.heartbeat_at END,
                run_id = coalesce(%(run_id)s, m.run_id),
                updated_at = now()
            FROM pipelines p
            WHERE p.id = m.pipeline_id AND p.name = %(name)s
            RETURNING m.pipeline_id
            """,
            {"state": state.value, "error": error, "run_id": run_id, "name": name},
        )
        if not rows:
            raise ConfigStoreError(f"Pipeline '{name}' does not exist in the config store.")

    def heartbeat(self, name: str, source_position_ms: int | None = None,
                  applied_lsn: int | None = None, run_id: str | None = None) -> None:
        """Stamp the pipeline alive (by ``run_id``, when a run streams it); ``source_position_ms``:
        source time of the newest change or heartbeat message applied (epoch milliseconds),
        ``applied_lsn``: its position, both for the replication lag (core.lag)."""
        self._query(
            """
            UPDATE pipeline_metadata m SET heartbeat_at = now(),
                source_position_at = coalesce(to_timestamp(%s / 1000.0), m.source_position_at),
                applied_lsn = coalesce('0/0'::pg_lsn + %s::numeric, m.applied_lsn),
                run_id = coalesce(%s, m.run_id)
            FROM pipelines p WHERE p.id = m.pipeline_id AND p.name = %s
            """,
            (source_position_ms, applied_lsn, run_id, name),
        )

    def record_lag(self, name: str, reading: LagReading) -> None:
        """The latest lag measurement, for /metrics and the API."""
        self._query(
            """
            UPDATE pipeline_metadata m SET lag_seconds = %s, lag_bytes = %s, lag_note = %s,
                lag_measured_at = now()
            FROM pipelines p WHERE p.id = m.pipeline_id AND p.name = %s
            """,
            (reading.seconds, reading.bytes, reading.note, name),
        )

    # -- refused changes (core.apply.errors) ------------------------------------------------

    def record_apply_error(self, name: str, report: dict[str, Any] | None) -> None:
        """The change ``name`` stopped on (None: it streamed past it)."""
        self._query(
            "UPDATE pipeline_metadata m SET last_apply_error = %s, updated_at = now() "
            "FROM pipelines p WHERE p.id = m.pipeline_id AND p.name = %s",
            (Json(report) if report is not None else None, name),
        )

    def request_skip(self, name: str, report: dict[str, Any], requested_by: str) -> int:
        rows = self._query(
            """
            INSERT INTO apply_skips (pipeline_id, destination, table_name, key, operation,
                                     position, requested_by)
            SELECT id, %s, %s, %s, %s, %s, %s FROM pipelines WHERE name = %s RETURNING id
            """,
            (report["destination"], report["table"], Json(report["key"]), report["operation"],
             report["position"], requested_by, name),
        )
        if not rows:
            raise ConfigStoreError(f"Pipeline '{name}' does not exist in the config store.")
        return int(rows[0]["id"])

    def pending_skips(self, name: str) -> list[dict[str, Any]]:
        return self._query(
            "SELECT s.* FROM apply_skips s JOIN pipelines p ON p.id = s.pipeline_id "
            "WHERE p.name = %s AND s.skipped_at IS NULL ORDER BY s.id", (name,))

    def list_skips(self, name: str) -> list[dict[str, Any]]:
        return self._query(
            "SELECT s.* FROM apply_skips s JOIN pipelines p ON p.id = s.pipeline_id "
            "WHERE p.name = %s ORDER BY s.id", (name,))

    def mark_skipped(self, skip_id: int) -> None:
        self._query("UPDATE apply_skips SET skipped_at = now() WHERE id = %s", (skip_id,))

    def park_events(self, name: str, rows: Sequence[ParkedRow]) -> None:
        if not rows:
            return
        with self.pool.connection() as conn, conn.cursor() as cursor:
            cursor.execute("SELECT id FROM pipelines WHERE name = %s", (name,))
            found = cursor.fetchone()
            if found is None:
                raise ConfigStoreError(f"Pipeline '{name}' does not exist in the config store.")
            cursor.executemany(
                """
                INSERT INTO parked_events (pipeline_id, destination, table_name, key, operation,
                                           position, event, error, sqlstate)
                VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)
                """,
                [(found[0], r.destination, r.table_name, Json(r.key), r.operation, r.position,
                  Json(r.event), r.error, r.sqlstate) for r in rows],
            )

    def list_parked(self, pipeline: str | None = None, table: str | None = None,
                    retry_requested: bool = False) -> list[ParkedEvent]:
        rows = self._query(
            _PARKED_SELECT + " WHERE (%(p)s::text IS NULL OR p.name = %(p)s) "
            "AND (%(t)s::text IS NULL OR e.table_name = %(t)s) "
            "AND (NOT %(r)s OR e.retry_requested_at IS NOT NULL) ORDER BY e.id",
            {"p": pipeline, "t": table, "r": retry_requested},
        )
        return [ParkedEvent.from_row(r) for r in rows]

    def parked_keys(self, name: str) -> list[tuple[str, str, dict[str, Any]]]:
        """``(destination, table, key)`` of every key with parked changes (not the changes)."""
        rows = self._query(
            "SELECT DISTINCT e.destination, e.table_name, e.key FROM parked_events e "
            "JOIN pipelines p ON p.id = e.pipeline_id WHERE p.name = %s", (name,))
        return [(r["destination"], r["table_name"], r["key"]) for r in rows]

    def parked_counts(self) -> list[tuple[str, str, str, int]]:
        """``(pipeline, destination, table, parked events)`` for everything parked."""
        rows = self._query(
            "SELECT p.name, e.destination, e.table_name, count(*) AS n FROM parked_events e "
            "JOIN pipelines p ON p.id = e.pipeline_id GROUP BY 1, 2, 3 ORDER BY 1, 2, 3")
        return [(r["name"], r["destination"], r["table_name"], int(r["n"])) for r in rows]

    def parked_since(self) -> dict[tuple[str, str, str], tuple[int, datetime]]:
        """``(pipeline, destination, table)`` -> (parked events, when the oldest was parked)."""
        rows = self._query(
            "SELECT p.name, e.destination, e.table_name, count(*) AS n, min(e.created_at) AS since "
            "FROM parked_events e JOIN pipelines p ON p.id = e.pipeline_id GROUP BY 1, 2, 3")
        return {(r["name"], r["destination"], r["table_name"]): (int(r["n"]), r["since"])
                for r in rows}

    def request_parked_retry(self, name: str, table: str | None = None,
                             key: dict[str, Any] | None = None) -> int:
        """Ask the pipeline's stream to replay parked changes (a table's, a key's, or all)."""
        rows = self._query(
            """
            UPDATE parked_events e SET retry_requested_at = now(), updated_at = now()
            FROM pipelines p WHERE p.id = e.pipeline_id AND p.name = %(p)s
              AND (%(t)s::text IS NULL OR e.table_name = %(t)s)
              AND (%(k)s::jsonb IS NULL OR e.key = %(k)s::jsonb)
            RETURNING e.id
            """,
            {"p": name, "t": table, "k": Json(key) if key is not None else None},
        )
        return len(rows)

    def release_parked(self, ids: Sequence[int]) -> None:
        self._query("DELETE FROM parked_events WHERE id = ANY(%s)", (list(ids),))

    def parked_retry_failed(self, ids: Sequence[int], error: str, sqlstate: str | None) -> None:
        self._query(
            "UPDATE parked_events SET attempts = attempts + 1, retry_requested_at = NULL, "
            "error = CASE WHEN id = %(first)s THEN %(error)s ELSE error END, "
            "sqlstate = CASE WHEN id = %(first)s THEN %(sqlstate)s ELSE sqlstate END, "
            "updated_at = now() WHERE id = ANY(%(ids)s)",
            {"ids": list(ids), "first": min(ids), "error": error, "sqlstate": sqlstate},
        )

    def discard_parked(self, name: str, table: str | None = None,
                       key: dict[str, Any] | None = None) -> int:
        rows = self._query(
            """
            DELETE FROM parked_events e USING pipelines p
            WHERE p.id = e.pipeline_id AND p.name = %(p)s
              AND (%(t)s::text IS NULL OR e.table_name = %(t)s)
              AND (%(k)s::jsonb IS NULL OR e.key = %(k)s::jsonb)
            RETURNING e.id
            """,
            {"p": name, "t": table, "k": Json(key) if key is not None else None},
        )
        return len(rows)

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
        rows = self._query(_BACKFILL_SELECT + " WHERE j.id = %s", (job_id,))
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
            (job_id, [s.value for s in _TERMINAL_BACKFILL_STATUSES]),
        )
        return self.get_backfill_job(job_id)

    def list_backfill_jobs(
        self, *, pipeline: str | None = None, status: BackfillStatus | None = None
    ) -> list[BackfillJob]:
        rows = self._query(
            _BACKFILL_SELECT
            + """
            WHERE (%(pipeline)s::text IS NULL OR p.name = %(pipeline)s)
              AND (%(status)s::text IS NULL OR j.status = %(status)s)
            ORDER BY j.id
            """,
            {"pipeline": pipeline, "status": None if status is None else BackfillStatus(status)},
        )
        return [BackfillJob.from_row(row) for row in rows]

    def claim_pending_backfill_jobs(self, limit: int = 10) -> list[BackfillJob]:
        """Move up to ``limit`` PENDING jobs to QUEUED and return them.

        ``FOR UPDATE SKIP LOCKED`` lets several claimers run at once without ever handing the
        same job to two of them.
        """
        rows = self._query(
            """
            WITH claimed AS (
                SELECT id FROM backfill_jobs
                WHERE status = 'PENDING'
                ORDER BY created_at, id
                LIMIT %s
                FOR UPDATE SKIP LOCKED
            )
            UPDATE backfill_jobs j SET status = 'QUEUED', updated_at = now()
            FROM claimed WHERE j.id = claimed.id
            RETURNING j.id
            """,
            (limit,),
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
            ([s.value for s in _TERMINAL_BACKFILL_STATUSES], older_than_days),
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
                "terminal": [s.value for s in _TERMINAL_BACKFILL_STATUSES],
                "id": job_id,
            },
        )
        if not rows:
            raise ConfigStoreError(f"Backfill job {job_id} does not exist in the config store.")
        return self.get_backfill_job(job_id)

    # -- monitoring ------------------------------------------------------------------------

    def record_flows(self, pipeline: str, flows: Sequence[tuple[str, str, int]]) -> None:
        """Append one batch's applied record counts, ``(destination, table, count)`` each."""
        if not flows:
            return
        destinations, tables, counts = (list(column) for column in zip(*flows, strict=True))
        self._query(
            """
            INSERT INTO data_flow_record_monitoring (pipeline_id, destination, table_name,
                                                     record_count)
            SELECT p.id, f.destination, f.table_name, f.record_count
            FROM pipelines p,
                 unnest(%s::text[], %s::text[], %s::bigint[])
                     AS f(destination, table_name, record_count)
            WHERE p.name = %s
            """,
            (destinations, tables, counts, pipeline),
        )

    def record_wal_reading(
        self,
        *,
        source: str,
        slot_name: str,
        status: str,
        pipeline: str | None = None,
        current_lsn: str | None = None,
        confirmed_flush_lsn: str | None = None,
        retained_wal_bytes: int | None = None,
        lag_bytes: int | None = None,
        active: bool | None = None,
        wal_status: str | None = None,
    ) -> None:
        self._query(
            """
            INSERT INTO wal_monitor (source, slot_name, pipeline_id, current_lsn,
                                     confirmed_flush_lsn, retained_wal_bytes, lag_bytes, status,
                                     active, wal_status)
            VALUES (%s, %s, (SELECT id FROM pipelines WHERE name = %s), %s, %s, %s, %s, %s, %s,
                    %s)
            """,
            (source, slot_name, pipeline, current_lsn, confirmed_flush_lsn, retained_wal_bytes,
             lag_bytes, status, active, wal_status),
        )

    def latest_wal_readings(self, limit_per_slot: int = 1) -> list[dict[str, Any]]:
        return self._query(
            """
            SELECT * FROM (
                SELECT w.*, p.name AS pipeline,
                       row_number() OVER (PARTITION BY w.source, w.slot_name
                                          ORDER BY w.checked_at DESC, w.id DESC) AS n
                FROM wal_monitor w LEFT JOIN pipelines p ON p.id = w.pipeline_id
            ) r WHERE n <= %s ORDER BY source, slot_name, checked_at DESC
            """,
            (limit_per_slot,),
        )

    def metrics_snapshot(self) -> dict[str, list[dict[str, Any]]]:
        """Aggregates for /metrics, in one connection checkout."""
        with self.pool.connection() as conn, conn.cursor(cursor_factory=RealDictCursor) as cur:
            cur.execute(
                """
                SELECT p.name AS pipeline, f.destination, f.table_name, sum(f.record_count) AS events
                FROM data_flow_record_monitoring f JOIN pipelines p ON p.id = f.pipeline_id
                GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
                """
            )
            flows = [dict(r) for r in cur.fetchall()]
            cur.execute(
                """
                SELECT p.name, p.status, coalesce(m.state, 'PAUSED') AS state, m.source_position_at,
                       m.last_apply_error, m.lag_seconds, m.lag_bytes, m.lag_measured_at
                FROM pipelines p LEFT JOIN pipeline_metadata m ON m.pipeline_id = p.id ORDER BY 1
                """
            )
            pipelines = [dict(r) for r in cur.fetchall()]
            cur.execute(
                """
                SELECT p.name AS pipeline, j.status, sum(j.count_record) AS rows
                FROM backfill_jobs j JOIN pipelines p ON p.id = j.pipeline_id GROUP BY 1, 2
                """
            )
            backfills = [dict(r) for r in cur.fetchall()]
        parked = [{"pipeline": p, "destination": d, "table_name": t, "count": n}
                  for p, d, t, n in self.parked_counts()]
        return {"flows": flows, "pipelines": pipelines, "backfills": backfills,
                "wal": self.latest_wal_readings(), "parked": parked}

    def flush_pool_events(self, others: Sequence[ResilientConnectionPool] = ()) -> int:
        """Record the unreported health events (see ``take_unreported_events``) and the
        utilisation of this store's pool and of ``others`` (e.g. a stream's destination pools)."""
        process = f"{socket.gethostname()}:{os.getpid()}"
        pools = [self.pool, *others]
        events = [(pool.label, kind, count) for pool in pools
                  for kind, count in pool.take_unreported_events()]
        if events:
            labels, kinds, counts = (list(c) for c in zip(*events, strict=True))
            self._query(
                """
                INSERT INTO pool_events (process, pool, kind, count)
                SELECT %s, p, k, c FROM unnest(%s::text[], %s::text[], %s::int[]) AS e(p, k, c)
                """,
                (process, labels, kinds, counts),
            )
        usage = [pool.take_usage() for pool in pools]
        # The peak is kept over windows of POOL_PEAK_WINDOW_S: a busy moment between two
        # reports stays visible to the check for at least that long.
        self._query(
            """
            INSERT INTO pool_usage AS u (process, pool, owner, max_conn, in_use, peak_in_use)
            SELECT %s, p, o, m, i, k
            FROM unnest(%s::text[], %s::text[], %s::int[], %s::int[], %s::int[]) AS e(p, o, m, i, k)
            ON CONFLICT (process, pool, owner) DO UPDATE SET
                max_conn = excluded.max_conn, in_use = excluded.in_use, reported_at = now(),
                peak_in_use = CASE WHEN u.peak_since > now() - make_interval(secs => %s)
                                   THEN greatest(u.peak_in_use, excluded.peak_in_use)
                                   ELSE excluded.peak_in_use END,
                peak_since = CASE WHEN u.peak_since > now() - make_interval(secs => %s)
                                  THEN u.peak_since ELSE now() END
            """,
            (process, [u.pool for u in usage], [u.owner for u in usage],
             [u.max_conn for u in usage], [u.in_use for u in usage],
             [u.peak_in_use for u in usage], POOL_PEAK_WINDOW_S, POOL_PEAK_WINDOW_S),
        )
        return len(events)

    def pool_usage(self, fresh_seconds: float = POOL_REPORT_FRESH_S) -> list[dict[str, Any]]:
        """Pools reported in the last ``fresh_seconds`` (older rows: processes that ended)."""
        self._query("DELETE FROM pool_usage WHERE reported_at < now() - interval '1 day'")
        return self._query(
            "SELECT process, pool, owner, max_conn, in_use, peak_in_use, reported_at "
            "FROM pool_usage WHERE reported_at > now() - make_interval(secs => %s) "
            "ORDER BY peak_in_use::float8 / max_conn DESC, owner, pool",
            (fresh_seconds,),
        )

    def pool_event_counts(self, since_seconds: float) -> dict[str, int]:
        rows = self._query(
            "SELECT kind, sum(count)::int AS n FROM pool_events "
            "WHERE created_at > now() - make_interval(secs => %s) GROUP BY kind",
            (since_seconds,),
        )
        return {row["kind"]: row["n"] for row in rows}

    def database_connections(self) -> int:
        """Sessions on the config store's database (the checklist's pg_stat_activity count)."""
        rows = self._query(
            "SELECT count(*)::int AS n FROM pg_stat_activity WHERE datname = current_database()"
        )
        return rows[0]["n"]

    # -- notifications (core.notify) ------------------------------------------------------------

    def record_notification_attempt(
        self, *, channel: str, dedupe_key: str, alert_key: str, pipeline: str | None,
        transition: str, severity: str, text: str, attempt: int, delivered: bool,
        http_status: int | None, error: str | None,
    ) -> None:
        self._query(
            """
            INSERT INTO notification_log (channel, dedupe_key, alert_key, pipeline, transition,
                                          severity, text, attempt, delivered, http_status, error)
            VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
            """,
            (channel, dedupe_key, alert_key, pipeline, transition, severity, text, attempt,
             delivered, http_status, error),
        )

    def notification_delivered(self, dedupe_key: str) -> bool:
        rows = self._query("SELECT 1 FROM notification_log WHERE dedupe_key = %s AND delivered "
                           "LIMIT 1", (dedupe_key,))
        return bool(rows)

    def list_notifications(self, limit: int = 50, pipeline: str | None = None
                           ) -> list[dict[str, Any]]:
        """The latest delivery attempts, newest first."""
        return self._query(
            """
            SELECT id, channel, alert_key, pipeline, transition, severity, text, attempt,
                   delivered, http_status, error, created_at
            FROM notification_log WHERE %(pipeline)s::text IS NULL OR pipeline = %(pipeline)s
            ORDER BY id DESC LIMIT %(limit)s
            """,
            {"pipeline": pipeline, "limit": limit},
        )

    def record_offset_cleanup(
        self, *, pipeline: str, offset_file: str, slot_name: str, reason: str
    ) -> None:
        self._query(
            """
            INSERT INTO offset_cleanups (pipeline_id, offset_file, slot_name, reason)
            VALUES ((SELECT id FROM pipelines WHERE name = %s), %s, %s, %s)
            """,
            (pipeline, offset_file, slot_name, reason),
        )

    def list_offset_cleanups(self, limit: int = 20) -> list[dict[str, Any]]:
        return self._query(
            """
            SELECT c.id, p.name AS pipeline, c.offset_file, c.slot_name, c.reason, c.created_at
            FROM offset_cleanups c LEFT JOIN pipelines p ON p.id = c.pipeline_id
            ORDER BY c.created_at DESC, c.id DESC LIMIT %s
            """,
            (limit,),
        )
