"""Asset checks on a pipeline's replication slot (the WAL monitor also emits them)."""

from dagster import (
    AssetCheckEvaluation,
    AssetCheckResult,
    AssetChecksDefinition,
    AssetCheckSeverity,
    AssetKey,
    MetadataValue,
    asset_check,
)

from rosetta_dagster.core.pipeline_config import OperationsSettings, PipelineDefinition, load_config
from rosetta_dagster.core.replication import SlotReading, WalSeverity, read_slot, source_connection
from rosetta_dagster.defs.pipelines.assets import replication_slot_key

RETAINED_WAL_CHECK = "retained_wal"


def retained_wal_outcome(
    reading: SlotReading, operations: OperationsSettings
) -> tuple[bool, AssetCheckSeverity, dict[str, MetadataValue], str]:
    """(passed, severity, metadata, description) of the checklist's "Debezium WAL lag" row."""
    severity = reading.severity(operations)
    metadata = {
        "retained_wal_bytes": MetadataValue.int(reading.retained_wal_bytes or 0),
        "warning_threshold_bytes": MetadataValue.int(operations.wal_warning_bytes),
        "critical_threshold_bytes": MetadataValue.int(operations.wal_critical_bytes),
    }
    if severity is WalSeverity.MISSING:
        description = f"Replication slot {reading.slot_name} does not exist on {reading.source}."
        return False, AssetCheckSeverity.WARN, metadata, description
    description = f"Slot {reading.slot_name} retains {reading.retained_wal_bytes} bytes of WAL."
    if severity is WalSeverity.CRITICAL:
        return False, AssetCheckSeverity.ERROR, metadata, description
    return (severity is WalSeverity.OK), AssetCheckSeverity.WARN, metadata, description


def retained_wal_evaluation(reading: SlotReading, operations: OperationsSettings) -> AssetCheckEvaluation:
    passed, severity, metadata, description = retained_wal_outcome(reading, operations)
    return AssetCheckEvaluation(
        asset_key=AssetKey(["replication_slot", reading.pipeline]),
        check_name=RETAINED_WAL_CHECK,
        passed=passed,
        severity=severity,
        metadata=metadata,
        description=description,
    )


def build_slot_checks(pipeline: PipelineDefinition) -> list[AssetChecksDefinition]:
    name = pipeline.name

    @asset_check(
        asset=replication_slot_key(pipeline),
        name=RETAINED_WAL_CHECK,
        description="WAL the slot retains: WARN above wal_warning_mb, ERROR above wal_critical_mb.",
    )
    def retained_wal() -> AssetCheckResult:
        config = load_config()
        resolved = config.pipeline(name)
        with source_connection(resolved) as conn:
            reading = read_slot(conn, resolved)
        passed, severity, metadata, description = retained_wal_outcome(reading, config.operations)
        return AssetCheckResult(
            passed=passed, severity=severity, metadata=metadata, description=description
        )

    return [retained_wal]
