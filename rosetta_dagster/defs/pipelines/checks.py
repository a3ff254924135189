"""Asset checks of a pipeline: parity, lag, refused and parked changes on each destination
table; the stream runs (stream_health), the slot exists, is active and retains little WAL.
Evaluated by the health-check schedule (and from the UI); the WAL monitor sensor also emits
``retained_wal``."""

import dataclasses
import logging
from collections.abc import Iterator

from dagster import (
    AssetCheckEvaluation,
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetChecksDefinition,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetKey,
    multi_asset_check,
)

from rosetta_dagster.core.config_store import ConfigStore, Pipeline
from rosetta_dagster.core.health import (
    CheckOutcome,
    CheckTarget,
    evaluate_pipeline,
    replication_lag,
    retained_wal,
)
from rosetta_dagster.core.lag import LagReading
from rosetta_dagster.core.pipeline_config import (
    OperationsSettings,
    PipelineDefinition,
    PipelineFile,
)
from rosetta_dagster.core.repair import request_repair
from rosetta_dagster.core.replication import SlotReading
from rosetta_dagster.defs.naming import AssetNaming
from rosetta_dagster.defs.pipelines.assets import (
    destination_table_key,
    replication_slot_key,
    table_copy_key,
)
from rosetta_dagster.defs.platform.resources import ConfigStoreResource

TABLE_CHECKS = ("row_count_parity", "content_parity", "replication_lag", "apply_errors",
                "parked_events")
SLOT_CHECKS = ("stream_health", "slot_active", "retained_wal")
_SEVERITY = {"WARN": AssetCheckSeverity.WARN, "ERROR": AssetCheckSeverity.ERROR}


def check_result(outcome: CheckOutcome, asset_key: AssetKey) -> AssetCheckResult:
    return AssetCheckResult(
        asset_key=asset_key, check_name=outcome.name, passed=outcome.passed,
        severity=_SEVERITY[outcome.severity], description=outcome.description,
        metadata=outcome.metadata,
    )


def check_evaluation(outcome: CheckOutcome, asset_key: AssetKey) -> AssetCheckEvaluation:
    """An outcome reported from a sensor (not from the check's own op)."""
    return AssetCheckEvaluation(
        asset_key=asset_key, check_name=outcome.name, passed=outcome.passed,
        severity=_SEVERITY[outcome.severity], metadata=outcome.metadata,
        description=outcome.description,
    )


def retained_wal_evaluation(reading: SlotReading, operations: OperationsSettings,
                            naming: AssetNaming) -> AssetCheckEvaluation:
    """The WAL monitor's reading as a ``retained_wal`` check evaluation (sensor side)."""
    return check_evaluation(retained_wal(reading, operations),
                            naming.key(replication_slot_key(reading.pipeline)))


def lag_evaluations(pipeline: PipelineDefinition, stored: Pipeline, lag: LagReading,
                    operations: OperationsSettings, naming: AssetNaming
                    ) -> list[AssetCheckEvaluation]:
    """The WAL monitor's lag measurement as ``replication_lag`` on each destination table."""
    outcome = replication_lag(stored, operations, lag)
    return [check_evaluation(outcome, naming.key(table_copy_key(pipeline, destination, table)))
            for destination in pipeline.destinations for table in pipeline.tables]


def build_pipeline_checks(pipeline: PipelineDefinition, pipeline_file: PipelineFile,
                          naming: AssetNaming | None = None) -> list[AssetChecksDefinition]:
    """``pipeline_file``: what the definitions were built from (read again with its secrets at
    each evaluation); ``naming``: the keys of the assets checked."""
    name = pipeline.name
    naming = naming or AssetNaming()
    specs = [
        AssetCheckSpec(check, asset=naming.key(table_copy_key(pipeline, destination, table)))
        for destination in pipeline.destinations
        for table in pipeline.tables
        for check in TABLE_CHECKS
    ] + [AssetCheckSpec(check, asset=naming.key(replication_slot_key(pipeline)))
         for check in SLOT_CHECKS]

    @multi_asset_check(
        specs=specs,
        name=f"replication_health_{name}",
        description=f"Parity, lag, refused changes, stream and slot health of pipeline {name}.",
    )
    def replication_health(
        context: AssetCheckExecutionContext, config_store: ConfigStoreResource
    ) -> Iterator[AssetCheckResult]:
        config = pipeline_file.load()
        store = config_store.store
        stored = store.get_pipeline(name)
        definition = config.pipeline(name)
        parked = {(d, t): n for p, d, t, n in store.parked_counts() if p == name}
        for target, outcome in evaluate_pipeline(definition, stored, config.operations, parked,
                                                 store.recent_failures(name)):
            if outcome.differing is not None and definition.verification.repair:
                outcome = with_repair(outcome, store, name, context.log)
            context.log.info("%s %s: %s", target.label, outcome.name, outcome.description)
            yield check_result(outcome, naming.key(asset_key_of(target)))

    return [replication_health]


def with_repair(outcome: CheckOutcome, store: ConfigStore, pipeline: str,
                log: logging.Logger | logging.LoggerAdapter[logging.Logger]) -> CheckOutcome:
    """A failed content_parity with the backfill that repairs its range requested (once)."""
    assert outcome.differing is not None
    job, requested = request_repair(store, pipeline, outcome.differing, log)
    said = "requested" if requested else "already requested"
    return dataclasses.replace(
        outcome, description=f"{outcome.description} Repair {said}: backfill job {job.id}.",
        metadata={**outcome.metadata, "repair_job": job.id})


def asset_key_of(target: CheckTarget) -> AssetKey:
    if target.kind == "destination_table" and target.destination and target.target:
        return destination_table_key(target.destination, target.target)
    if target.kind == "replication_slot" and target.pipeline:
        return replication_slot_key(target.pipeline)
    return AssetKey(["config_db"])
