"""The backfill asset of a pipeline, partitioned by backfill job (one dynamic partition per job)."""

from dagster import (
    AssetCheckSpec,
    AssetExecutionContext,
    AssetKey,
    AssetsDefinition,
    AssetSpec,
    DynamicPartitionsDefinition,
    Failure,
    MaterializeResult,
    MetadataValue,
    asset,
)

from rosetta_dagster.core.backfill import BackfillCancelled, BackfillError, BackfillRunner
from rosetta_dagster.core.health import backfill_retry_attempts, backfill_row_parity
from rosetta_dagster.core.pipeline_config import PipelineDefinition, PipelineFile
from rosetta_dagster.defs.naming import AssetNaming, RosettaAsset
from rosetta_dagster.defs.pipelines.checks import check_result
from rosetta_dagster.defs.platform.resources import ConfigStoreResource


def backfill_asset_key(pipeline: str) -> AssetKey:
    return AssetKey(["backfill", pipeline])


def backfill_partitions_name(pipeline: str) -> str:
    return f"backfill_jobs_{pipeline}"


def build_backfill_asset(pipeline: PipelineDefinition, pipeline_file: PipelineFile,
                         naming: AssetNaming | None = None) -> AssetsDefinition:
    """``pipeline_file``: what the definitions were built from (read again with its secrets by
    each run); ``naming``: its key and attributes."""
    name = pipeline.name
    spec = (naming or AssetNaming()).spec(AssetSpec(
        backfill_asset_key(name), group_name=name,
        kinds={"postgres", *(d.kind for d in pipeline.destinations)},
        description=f"Backfill jobs of pipeline {name}: each partition is one job (its id) that "
        "re-copies matching source rows into every destination while the stream runs.",
    ), RosettaAsset("backfill", name, pipeline.source.name))
    key = spec.key

    @asset(
        key=key,
        check_specs=[
            AssetCheckSpec("row_count", asset=key, blocking=True, description=(
                "Every destination holds as many rows matching the job's filter as the source.")),
            AssetCheckSpec("retry_attempts", asset=key, description=(
                "Attempts the job needed: WARN > 1, ERROR > 2 (checklist).")),
        ],
        partitions_def=DynamicPartitionsDefinition(name=backfill_partitions_name(name)),
        group_name=spec.group_name,
        kinds=spec.kinds,
        tags=spec.tags,
        owners=spec.owners,
        metadata=spec.metadata,
        description=spec.description,
    )
    def backfill(context: AssetExecutionContext, config_store: ConfigStoreResource) -> MaterializeResult:
        job_id = int(context.partition_key)
        config = pipeline_file.load()
        store = config_store.store
        runner = BackfillRunner(
            config.pipeline(name), store, job_id,
            chunk_rows=config.operations.backfill_chunk_rows,
            max_attempts=config.operations.backfill_max_attempts,
            log=context.log,  # type: ignore[arg-type]
        )
        try:
            result = runner.run()
        except BackfillCancelled as exc:
            raise Failure(str(exc), allow_retries=False) from None
        except BackfillError as exc:
            raise Failure(str(exc)) from None
        except BaseException:
            # Run terminated (or the process is going down): the job stops here.
            store.cancel_backfill_job(job_id)
            raise
        context.log.info("Backfill job %d completed: %d rows in %.1fs (%.0f rows/s); destination "
                         "rows inserted %d, updated %d, deleted %d", job_id, result.rows,
                         result.seconds, result.rows_per_second, result.inserted, result.updated,
                         result.deleted)
        checks = [
            backfill_row_parity(config.pipeline(name), result.table, result.filter_sql,
                                result.filter_params, config.operations.parity_window_seconds),
            backfill_retry_attempts(job_id, result.attempts),
        ]
        return MaterializeResult(check_results=[check_result(c, key) for c in checks], metadata={
            "job_id": MetadataValue.int(job_id),
            "rows": MetadataValue.int(result.rows),
            "source_rows_matching": MetadataValue.int(result.total),
            "chunks": MetadataValue.int(result.chunks),
            "rows_inserted": MetadataValue.int(result.inserted),
            "rows_updated": MetadataValue.int(result.updated),
            "rows_deleted": MetadataValue.int(result.deleted),
            "duration_seconds": MetadataValue.float(round(result.seconds, 3)),
            "rows_per_second": MetadataValue.float(round(result.rows_per_second, 1)),
        })

    return backfill
