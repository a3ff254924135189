"""The streaming job of a pipeline: one long-running op that owns the capture engine."""

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Literal

from dagster import (
    AssetMaterialization,
    AssetObservation,
    Config,
    DagsterExecutionInterruptedError,
    JobDefinition,
    MetadataValue,
    OpExecutionContext,
    in_process_executor,
    job,
    op,
)

from rosetta_dagster.core.config_store import ConfigStore
from rosetta_dagster.core.events import format_lsn
from rosetta_dagster.core.health import measure_and_record_lag
from rosetta_dagster.core.initial_load import TableLoadReport
from rosetta_dagster.core.pipeline_config import PipelineDefinition, PipelineFile
from rosetta_dagster.core.streaming import StreamingSession, StreamProgress
from rosetta_dagster.core.streaming.termination import termination_event
from rosetta_dagster.defs.naming import AssetNaming
from rosetta_dagster.defs.pipelines.assets import table_copy_key
from rosetta_dagster.defs.platform.resources import ConfigStoreResource
from rosetta_dagster.settings import offsets_dir

PIPELINE_TAG = "rosetta/pipeline"
OBSERVATION_INTERVAL_S = 30.0


def stream_job_name(pipeline: str) -> str:
    return f"stream_{pipeline}"


def _observe(context: OpExecutionContext, pipeline: PipelineDefinition, progress: StreamProgress,
             store: ConfigStore, naming: AssetNaming) -> None:
    """Periodic (not per-batch) progress: a log line and one observation per destination table,
    with the pipeline's replication lag measured on the source (core.lag)."""
    applied_at = (datetime.fromtimestamp(progress.source_position_ms / 1000, UTC)
                  if progress.source_position_ms is not None else None)
    lag = measure_and_record_lag(pipeline, store, applied_at, progress.applied_lsn)
    context.log.info(
        "Pipeline %s: %d events applied in %d batches; replication lag %s",
        pipeline.name, progress.events_applied, progress.batches,
        f"{lag.seconds:.1f}s, {lag.bytes} bytes" if lag.seconds is not None else lag.note,
    )
    for table in pipeline.tables:
        table_progress = progress.tables.get(table)
        metadata = {
            "events_applied": MetadataValue.int(table_progress.events_applied if table_progress else 0),
        }
        if lag.seconds is not None:
            metadata["lag_seconds"] = MetadataValue.float(round(lag.seconds, 3))
        if lag.bytes is not None:
            metadata["lag_bytes"] = MetadataValue.int(lag.bytes)
        if table_progress is not None and table_progress.last_source_ts_ms is not None:
            metadata["last_source_commit_ms"] = MetadataValue.int(table_progress.last_source_ts_ms)
        for destination in pipeline.destinations:
            context.log_event(
                AssetObservation(asset_key=naming.key(table_copy_key(pipeline, destination, table)),
                                 metadata=metadata)
            )


def _materialize_loaded_table(
    context: OpExecutionContext, pipeline: PipelineDefinition, report: TableLoadReport,
    naming: AssetNaming,
) -> None:
    """A destination table whose initial load completed now holds the source's rows."""
    destination = next(d for d in pipeline.destinations if d.name == report.destination)
    context.log_event(
        AssetMaterialization(
            asset_key=naming.key(table_copy_key(pipeline, destination, report.table)),
            description=f"Initial load of {report.table.qualified} by pipeline {pipeline.name}",
            metadata={
                "rows": MetadataValue.int(report.rows),
                "seconds": MetadataValue.float(round(report.seconds, 3)),
                "rows_per_second": MetadataValue.float(round(report.rows_per_second, 1)),
                "load_mode": MetadataValue.text(report.mode),
                "consistent_point": MetadataValue.text(format_lsn(report.consistent_lsn)),
            },
        )
    )


def build_stream_job(pipeline: PipelineDefinition, pipeline_file: PipelineFile,
                     run_tags: Mapping[str, str] | None = None,
                     naming: AssetNaming | None = None) -> JobDefinition:
    """``pipeline_file``: what the definitions were built from; the run reads it again to
    resolve the secrets. ``run_tags``: more tags for the job's runs (e.g. for a run launcher).
    ``naming``: the keys its materializations and observations go to."""
    naming = naming or AssetNaming()
    name = pipeline.name

    engine = pipeline.settings.engine

    @op(
        name=f"{engine}_stream_{name}",
        description=f"Streams pipeline {name} with the {engine} engine until the run is terminated.",
    )
    def stream(context: OpExecutionContext, config_store: ConfigStoreResource) -> None:
        # Secrets are resolved at run time, so the UI loads even where they are not set.
        resolved = pipeline_file.load().pipeline(name)
        store = config_store.store
        store.sync_pipeline(resolved)
        session = StreamingSession(
            resolved,
            offsets_dir=offsets_dir(),
            config_store=store,
            run_id=context.run_id,
            log=context.log,  # type: ignore[arg-type]
            on_table_loaded=lambda report: _materialize_loaded_table(context, resolved, report,
                                                                     naming),
        )
        with termination_event() as terminating:
            session.run(
                tick=lambda progress: _observe(context, resolved, progress, store, naming),
                tick_interval_s=OBSERVATION_INTERVAL_S,
                stop_when=lambda _: terminating.is_set(),
            )
        if terminating.is_set():  # Dagster's interrupt was lost on its way (see termination)
            raise DagsterExecutionInterruptedError()

    @job(
        name=stream_job_name(name),
        # One long-running op: running it in the run's own process means no extra step
        # process (memory), and the run process is the one that streams and heartbeats.
        executor_def=in_process_executor,
        description=f"Long-running {engine} stream of pipeline {name}; terminate it to stop cleanly.",
        tags={**(run_tags or {}), PIPELINE_TAG: name},
    )
    def stream_job() -> None:
        stream()

    return stream_job


class PipelineStatusConfig(Config):
    pipeline: str
    status: Literal["START", "PAUSE"]


@op(description="Sets a pipeline's desired status; the supervisor sensor acts on its next tick.")
def set_pipeline_status_op(
    context: OpExecutionContext, config: PipelineStatusConfig, config_store: ConfigStoreResource
) -> None:
    pipeline = config_store.store.set_pipeline_status(config.pipeline, config.status)
    context.log.info("Pipeline %s: desired status %s", pipeline.name, pipeline.status.value)


@job(
    name="set_pipeline_status",
    description="Start or pause a pipeline (same as `rosetta pipeline start|pause NAME`).",
)
def set_pipeline_status_job() -> None:
    set_pipeline_status_op()
