"""The config store's records: desired status and observed state of pipelines, backfill jobs,
parked changes (typed rows, enums compared as enums)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from rosetta_dagster.core.lag import LagReading

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


PIPELINE_SELECT = """
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


PARKED_SELECT = """
    SELECT e.*, p.name AS pipeline FROM parked_events e JOIN pipelines p ON p.id = e.pipeline_id
"""

BACKFILL_SELECT = """
    SELECT j.*, p.name AS pipeline
    FROM backfill_jobs j JOIN pipelines p ON p.id = j.pipeline_id
"""

TERMINAL_BACKFILL_STATUSES = (
    BackfillStatus.COMPLETED,
    BackfillStatus.FAILED,
    BackfillStatus.CANCELLED,
)
