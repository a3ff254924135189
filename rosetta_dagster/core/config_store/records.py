"""The config store's records: desired status and observed state of pipelines, backfill jobs,
refused and parked changes, telemetry and notifications (typed rows, enums compared as
enums)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime
from enum import StrEnum
from typing import Any, Self

from rosetta_dagster.core.destination.errors import RefusedChange
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
    # The refused change the pipeline stopped on.
    last_apply_error: RefusedChange | None = None
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
            last_apply_error=(None if row.get("last_apply_error") is None
                              else RefusedChange.from_dict(row["last_apply_error"])),
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


class _Row:
    """A record read from one row whose columns carry the fields' names."""

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Self:
        return cls(**{f.name: row[f.name] for f in fields(cls)})  # type: ignore[arg-type]


@dataclass(frozen=True)
class ParkedEvent(ParkedRow, _Row):
    """A parked change as stored: a change parked because a destination refused it (or an
    earlier change of its key)."""

    id: int
    pipeline: str
    attempts: int
    retry_requested_at: datetime | None
    created_at: datetime


@dataclass(frozen=True)
class ApplySkip(_Row):
    """A refused change a person asked the stream to skip (``rosetta pipeline skip``)."""

    id: int
    destination: str
    table_name: str
    key: dict[str, str | None]
    operation: str
    position: str
    requested_by: str
    requested_at: datetime
    skipped_at: datetime | None  # when the stream dropped it


@dataclass(frozen=True)
class PipelineFailure(_Row):
    """One failure of a pipeline's stream."""

    error: str | None
    failed_at: datetime


@dataclass(frozen=True)
class WalReading(_Row):
    """One WAL monitor reading of a slot."""

    source: str
    slot_name: str
    pipeline: str | None
    current_lsn: str | None
    confirmed_flush_lsn: str | None
    retained_wal_bytes: int | None
    lag_bytes: int | None
    status: str  # OK, WARNING, CRITICAL or MISSING (no slot)
    active: bool | None
    wal_status: str | None
    checked_at: datetime


@dataclass(frozen=True)
class PoolUsage(_Row):
    """What one process's pool reported: its size, connections in use and recent peak."""

    process: str
    pool: str
    owner: str
    max_conn: int
    in_use: int
    peak_in_use: int
    reported_at: datetime


@dataclass(frozen=True)
class NotificationAttempt(_Row):
    """One attempt to deliver an alert to a channel."""

    id: int
    channel: str
    alert_key: str
    pipeline: str | None
    transition: str
    severity: str
    text: str
    attempt: int
    delivered: bool
    http_status: int | None
    error: str | None
    created_at: datetime


@dataclass(frozen=True)
class OffsetCleanup(_Row):
    """A stream position forgotten because its slot was gone."""

    id: int
    pipeline: str | None
    offset_file: str
    slot_name: str
    reason: str
    created_at: datetime


@dataclass(frozen=True)
class FlowCount(_Row):
    pipeline: str
    destination: str
    table_name: str
    events: int


@dataclass(frozen=True)
class PipelineGauge(_Row):
    """A pipeline as /metrics shows it."""

    name: str
    status: str
    state: str
    source_position_at: datetime | None
    stopped_on_refused_change: bool
    lag_seconds: float | None
    lag_bytes: int | None
    lag_measured_at: datetime | None


@dataclass(frozen=True)
class BackfillRows(_Row):
    pipeline: str
    status: str
    rows: int


@dataclass(frozen=True)
class ParkedCount:
    pipeline: str
    destination: str
    table_name: str
    count: int


@dataclass(frozen=True)
class MetricsSnapshot:
    """The config store's aggregates for /metrics, read in one go."""

    flows: list[FlowCount]
    pipelines: list[PipelineGauge]
    backfills: list[BackfillRows]
    wal: list[WalReading]
    parked: list[ParkedCount]


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
