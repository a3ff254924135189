"""The checklist's success criteria and alert thresholds as checks over real data.

Pure Python: the Dagster asset checks and ``rosetta validate`` both evaluate these. Every
outcome carries the measured value and its threshold, so the UI can plot its history.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from rosetta_dagster.core.config_store import ConfigStore, Pipeline, PipelineFailure
from rosetta_dagster.core.destination import destination_kind
from rosetta_dagster.core.destination.postgres.reader import PostgresTableReader
from rosetta_dagster.core.health.outcome import CheckOutcome, KeyRange, Severity, threshold_outcome
from rosetta_dagster.core.health.parity import (
    backfill_row_parity,
    content_parity,
    row_count_parity,
)
from rosetta_dagster.core.health.pools import (
    closed_connection_errors,
    pool_initialised,
    pool_utilisation,
    server_connections,
    servers_of,
)
from rosetta_dagster.core.health.stream import (
    apply_errors,
    measure_and_record_lag,
    parked_events,
    replication_lag,
    retained_wal,
    slot_active,
    stream_health,
)
from rosetta_dagster.core.lag import measure_lag
from rosetta_dagster.core.pipeline_config import (
    Destination,
    OperationsSettings,
    PipelineDefinition,
    TableRef,
)
from rosetta_dagster.core.replication import read_slot, source_connection
from rosetta_dagster.core.table_schema import read_table_schema

# -- everything, for the schedule and `rosetta validate` ----------------------------------------


@dataclass(frozen=True)
class CheckTarget:
    """What a check judges: a destination table, a pipeline's slot, or the config store."""

    kind: Literal["destination_table", "replication_slot", "config_db"]
    pipeline: str | None = None
    destination: Destination | None = None
    table: TableRef | None = None
    target: TableRef | None = None  # the table written in the destination

    @property
    def label(self) -> str:
        if self.kind == "destination_table" and self.destination and self.target:
            return f"destination/{self.destination.name}/{self.target.schema}/{self.target.name}"
        if self.kind == "replication_slot":
            return f"replication_slot/{self.pipeline}"
        return "config_db"


def evaluate_pipeline(
    pipeline: PipelineDefinition, stored: Pipeline, operations: OperationsSettings,
    parked: Mapping[tuple[str, str], int] | None = None,
    failures: Sequence[PipelineFailure] = (),
) -> Iterator[tuple[CheckTarget, CheckOutcome]]:
    """Every check of one pipeline (its stream and slot first, then each destination table).
    ``parked``: parked changes by (destination, table); ``failures``: the stream's failures
    of the last hour (``ConfigStore.recent_failures``)."""
    parked = parked or {}
    slot = CheckTarget("replication_slot", pipeline.name)
    yield slot, stream_health(stored, operations, failures)
    with source_connection(pipeline) as source:
        source_rows = PostgresTableReader(source)
        reading = read_slot(source, pipeline)
        lag = measure_lag(source, pipeline, stored.source_position_at, stored.applied_lsn)
        yield slot, slot_active(reading, stored)
        yield slot, retained_wal(reading, operations)
        for destination in pipeline.destinations:
            with destination_kind(destination).open_reader(pipeline, destination) as target:
                for table in pipeline.tables:
                    where = CheckTarget("destination_table", pipeline.name, destination, table,
                                        pipeline.target(table, destination))
                    schema = read_table_schema(source, table, f"source {pipeline.source.name}",
                                               pipeline.options(table))
                    written = schema.target_sql(destination.name, destination.schema)
                    yield where, row_count_parity(source_rows, target, schema, written,
                                                  operations.parity_window_seconds)
                    yield where, content_parity(source_rows, target, schema, written,
                                                operations.parity_chunk_rows,
                                                operations.parity_window_seconds,
                                                pipeline=pipeline.name)
                    yield where, replication_lag(stored, operations, lag)
                    yield where, apply_errors(stored, destination.name, table)
                    yield where, parked_events(pipeline.name, destination.name, table,
                                               parked.get((destination.name, table.qualified), 0))


def evaluate_config_store(
    store: ConfigStore, operations: OperationsSettings,
    pipelines: Sequence[PipelineDefinition] = (),
) -> list[CheckOutcome]:
    """The pool checks, and sessions against max_connections on config_db and on the servers
    of ``pipelines``."""
    store.flush_pool_events()  # this process's own events count too
    return [pool_utilisation(store, operations),
            server_connections(*servers_of(store, pipelines), operations),
            closed_connection_errors(store), pool_initialised(store)]


# -- backfill jobs -------------------------------------------------------------------------------


def backfill_retry_attempts(job_id: int, attempts: int) -> CheckOutcome:
    """Checklist "Backfill retry attempts": WARN > 1 per job, ERROR > 2 per job."""
    return threshold_outcome("retry_attempts", attempts, 1, 2,
                              f"Backfill job {job_id} attempts")


__all__ = [
    "CheckOutcome",
    "CheckTarget",
    "KeyRange",
    "Severity",
    "backfill_retry_attempts",
    "backfill_row_parity",
    "content_parity",
    "evaluate_config_store",
    "evaluate_pipeline",
    "measure_and_record_lag",
    "replication_lag",
    "retained_wal",
    "row_count_parity",
    "stream_health",
]
