"""A pipeline's stream: replication lag, apply errors, parked changes, its slot and the WAL it
retains."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from datetime import UTC, datetime

from rosetta_dagster.core.config_store import (
    ConfigStore,
    Pipeline,
    PipelineFailure,
    PipelineState,
    PipelineStatus,
)
from rosetta_dagster.core.errors import DatabaseConnectionError
from rosetta_dagster.core.health.outcome import CheckOutcome, threshold_outcome
from rosetta_dagster.core.lag import LagReading, measure_lag
from rosetta_dagster.core.pipeline_config import (
    OperationsSettings,
    PipelineDefinition,
    TableRef,
)
from rosetta_dagster.core.replication import (
    SlotReading,
    WalSeverity,
    format_bytes,
    source_connection,
)


def replication_lag(
    pipeline: Pipeline, operations: OperationsSettings, reading: LagReading
) -> CheckOutcome:
    """The age of the oldest source commit the destinations do not have, 0 when none is
    pending (core.lag). Judged only while the pipeline is START; measured always."""
    if reading.seconds is None:
        metadata: dict[str, float | int | str] = {
            "value": 0, "warning_threshold": operations.lag_warning_seconds,
            "critical_threshold": operations.lag_critical_seconds, **reading.as_metadata()}
        return CheckOutcome("replication_lag", False, "WARN",
                            f"Replication lag of pipeline {pipeline.name} is unknown: "
                            f"{reading.note}.", metadata)
    lag = round(reading.seconds, 1)
    outcome = threshold_outcome("replication_lag", lag, operations.lag_warning_seconds,
                                 operations.lag_critical_seconds, "Replication lag",
                                "{:g}s".format)
    outcome.metadata.update(reading.as_metadata())
    if pipeline.status is not PipelineStatus.START:
        return dataclasses.replace(
            outcome, passed=True, severity="WARN",
            description=f"Pipeline {pipeline.name} is paused: lag {lag:g}s "
                        f"({reading.pending_transactions} pending transaction(s)) not judged.")
    return outcome


def measure_and_record_lag(
    pipeline: PipelineDefinition, store: ConfigStore | None,
    applied_at: datetime | None, applied_lsn: int | None,
) -> LagReading:
    """Measure on a connection of its own and keep the reading for /metrics and the API; a
    source that cannot be reached gives an unmeasured reading, not an error."""
    try:
        with source_connection(pipeline) as conn:
            reading = measure_lag(conn, pipeline, applied_at, applied_lsn)
    except DatabaseConnectionError as exc:
        reading = LagReading(None, None, note=f"lag not measured: {exc}")
    if store is not None:
        store.record_lag(pipeline.name, reading)
    return reading


def apply_errors(pipeline: Pipeline, destination: str, table: TableRef) -> CheckOutcome:
    """ERROR while the pipeline is stopped on a change of this table that this destination
    refused (the report as metadata). A stream that failed otherwise is ``stream_health``'s."""
    refused = pipeline.last_apply_error
    if refused is None:
        return CheckOutcome("apply_errors", True, "ERROR", "No refused change.",
                            {"value": 0, "threshold": 0})
    if (refused.destination, refused.table) == (destination, table.qualified):
        metadata: dict[str, float | int | str] = {"value": 1, "threshold": 0}
        metadata.update({k: json.dumps(v) if isinstance(v, dict) else str(v)
                         for k, v in refused.as_dict().items() if v is not None})
        return CheckOutcome("apply_errors", False, "ERROR", refused.sentence(), metadata)
    return CheckOutcome("apply_errors", True, "ERROR",
                        f"Pipeline {pipeline.name} stopped on a change of {refused.table} "
                        f"on {refused.destination}, not of this table.",
                        {"value": 0, "threshold": 0})


# The checklist's critical rate for errors ("1 per minute"): a stream that failed this many
# times in the last FLAPPING_WINDOW_S is failing, even while it runs between failures.
FLAPPING_FAILURES = 5
FLAPPING_WINDOW_S = 300


def stream_health(pipeline: Pipeline, operations: OperationsSettings,
                  failures: Sequence[PipelineFailure], now: datetime | None = None
                  ) -> CheckOutcome:
    """Judges the present: ERROR while the pipeline should stream (START) and does not (no
    run reporting RUNNING with a fresh heartbeat), or while it fails about once a minute;
    failures of the last hour it recovered from are WARN context, not an ERROR.
    ``failures``: those of the last hour, newest first (``ConfigStore.recent_failures``)."""
    now = now or datetime.now(UTC)
    hour = [f for f in failures if (now - f.failed_at).total_seconds() <= 3600]
    flapping = [f for f in hour if (now - f.failed_at).total_seconds() <= FLAPPING_WINDOW_S]
    metadata: dict[str, float | int | str] = {
        "value": len(hour), "failures_last_hour": len(hour), "state": pipeline.state.value,
        "status": pipeline.status.value,
        # Any failure of the last hour warns; FLAPPING_FAILURES within the window is critical.
        "warning_threshold": 0, "critical_threshold": FLAPPING_FAILURES}
    last = (f" Last failure at {hour[0].failed_at:%Y-%m-%d %H:%M:%S %Z}: "
            f"{_first_line(hour[0].error)}." if hour else "")
    if hour:
        metadata["last_failure_at"] = hour[0].failed_at.isoformat()
    if pipeline.status is not PipelineStatus.START:
        return CheckOutcome("stream_health", True, "WARN",
                            f"Pipeline {pipeline.name} is paused: its stream is not judged "
                            f"({len(hour)} failure(s) in the last hour).", metadata)
    heartbeat_age = (None if pipeline.heartbeat_at is None
                     else (now - pipeline.heartbeat_at).total_seconds())
    if heartbeat_age is not None:
        metadata["heartbeat_age_seconds"] = round(heartbeat_age, 1)
    streaming = (pipeline.state is PipelineState.RUNNING and heartbeat_age is not None
                 and heartbeat_age <= operations.heartbeat_timeout_seconds)
    if not streaming:
        why = (f"its state is {pipeline.state.value}" if pipeline.state is not PipelineState.RUNNING
               else "its run stopped heartbeating" if heartbeat_age is not None
               else "no run has reported yet")
        return CheckOutcome("stream_health", False, "ERROR",
                            f"Pipeline {pipeline.name} should stream and does not: {why}."
                            + last, metadata)
    if len(flapping) >= FLAPPING_FAILURES:
        return CheckOutcome("stream_health", False, "ERROR",
                            f"Pipeline {pipeline.name} keeps failing: {len(flapping)} failures "
                            f"in the last {FLAPPING_WINDOW_S // 60} minutes." + last, metadata)
    if hour:
        recovered = (f"recovered at {pipeline.last_start_at:%Y-%m-%d %H:%M:%S %Z}"
                     if pipeline.last_start_at is not None else "streams again")
        return CheckOutcome("stream_health", False, "WARN",
                            f"Pipeline {pipeline.name} {recovered}; {len(hour)} failure(s) in "
                            "the last hour." + last, metadata)
    return CheckOutcome("stream_health", True, "WARN",
                        f"Pipeline {pipeline.name} streams (heartbeat {heartbeat_age:.0f}s ago); "
                        "no failure in the last hour.", metadata)


def _first_line(error: str | None) -> str:
    return (error or "no message").strip().splitlines()[0].rstrip(".")


def parked_events(pipeline: str, destination: str, table: TableRef, parked: int) -> CheckOutcome:
    """ERROR while changes of this table wait parked for this destination."""
    metadata: dict[str, float | int | str] = {"value": parked, "threshold": 0}
    if parked:
        return CheckOutcome("parked_events", False, "ERROR",
                            f"{parked} change(s) of {table.qualified} are parked for destination "
                            f"{destination}: `rosetta parked list --pipeline {pipeline}`, then "
                            "retry or discard them.", metadata)
    return CheckOutcome("parked_events", True, "ERROR", "Nothing parked.", metadata)


# -- replication slots ------------------------------------------------------------------


def slot_active(reading: SlotReading, pipeline: Pipeline) -> CheckOutcome:
    metadata: dict[str, float | int | str] = {"value": int(bool(reading.active)), "threshold": 1,
                                              "exists": int(reading.exists)}
    if pipeline.status is not PipelineStatus.START:
        return CheckOutcome("slot_active", True, "ERROR",
                            f"Pipeline {pipeline.name} is paused: the slot may be inactive.", metadata)
    if not reading.exists:
        return CheckOutcome("slot_active", False, "ERROR",
                            f"Slot {reading.slot_name} does not exist on {reading.source}.", metadata)
    if not reading.active:
        return CheckOutcome("slot_active", False, "WARN",
                            f"Slot {reading.slot_name} exists but no stream reads it.", metadata)
    return CheckOutcome("slot_active", True, "ERROR", f"Slot {reading.slot_name} is active.",
                        metadata)


def retained_wal(reading: SlotReading, operations: OperationsSettings) -> CheckOutcome:
    """Checklist "Debezium WAL lag": WARN > wal_warning_mb, ERROR > wal_critical_mb."""
    if reading.severity(operations) is WalSeverity.MISSING:
        return CheckOutcome("retained_wal", False, "WARN",
                            f"Replication slot {reading.slot_name} does not exist on {reading.source}.",
                            {"value": 0, "warning_threshold": operations.wal_warning_bytes,
                             "critical_threshold": operations.wal_critical_bytes})
    return threshold_outcome("retained_wal", reading.retained_wal_bytes or 0,
                              operations.wal_warning_bytes, operations.wal_critical_bytes,
                              f"WAL retained by {reading.slot_name}",
                             lambda size: format_bytes(int(size)))
