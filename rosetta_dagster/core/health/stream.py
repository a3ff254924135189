"""A pipeline's stream: replication lag, apply errors, parked changes, its slot and the WAL it
retains."""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime

from rosetta_dagster.core.config_store import ConfigStore, Pipeline, PipelineStatus
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
                                 operations.lag_critical_seconds, "Replication lag", "s")
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


def apply_errors(pipeline: Pipeline, since: datetime, destination: str, table: TableRef
                 ) -> CheckOutcome:
    """ERROR when the pipeline stopped on a change of this table that this destination refused
    (the report as metadata), or failed otherwise since ``since``."""
    refused = pipeline.last_apply_error
    if refused is not None:
        if (refused.destination, refused.table) == (destination, table.qualified):
            metadata: dict[str, float | int | str] = {"value": 1, "threshold": 0}
            metadata.update({k: json.dumps(v) if isinstance(v, dict) else str(v)
                             for k, v in refused.as_dict().items() if v is not None})
            return CheckOutcome("apply_errors", False, "ERROR", refused.sentence(), metadata)
        return CheckOutcome("apply_errors", True, "ERROR",
                            f"Pipeline {pipeline.name} stopped on a change of {refused.table} "
                            f"on {refused.destination}, not of this table.",
                            {"value": 0, "threshold": 0})
    failed = pipeline.last_error_at is not None and pipeline.last_error_at > since
    metadata = {"value": int(failed), "threshold": 0}
    if failed:
        return CheckOutcome("apply_errors", False, "ERROR",
                            f"Pipeline {pipeline.name} failed at "
                            f"{pipeline.last_error_at:%Y-%m-%d %H:%M:%S}: {pipeline.last_error}",
                            metadata)
    return CheckOutcome("apply_errors", True, "ERROR", "No failed batch.", metadata)


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
                              f"WAL retained by {reading.slot_name}", " bytes")
