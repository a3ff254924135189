"""The sensor that turns PENDING backfill jobs into partition runs of the backfill asset."""

import logging

from dagster import (
    AddDynamicPartitionsRequest,
    AssetSelection,
    DefaultSensorStatus,
    DeleteDynamicPartitionsRequest,
    RunRequest,
    SensorDefinition,
    SensorEvaluationContext,
    SensorResult,
    sensor,
)

from rosetta_dagster.core.backfill import fetch_pending_jobs
from rosetta_dagster.core.config_store import BackfillStatus
from rosetta_dagster.core.pipeline_config import RosettaConfig
from rosetta_dagster.defs.backfills.assets import backfill_asset_key, backfill_partitions_name
from rosetta_dagster.defs.platform.logs import TeeLogger
from rosetta_dagster.defs.platform.resources import ConfigStoreResource

backfill_logger = logging.getLogger("rosetta.backfill")


def build_backfill_sensor(config: RosettaConfig) -> SensorDefinition:
    operations = config.operations

    @sensor(
        name="backfill_jobs_sensor",
        asset_selection=AssetSelection.assets(
            *[backfill_asset_key(name) for name in config.pipelines]
        ),
        minimum_interval_seconds=operations.backfill_sensor_interval_seconds,
        default_status=DefaultSensorStatus.RUNNING,
        description="Claims PENDING backfill jobs and runs each as a partition of its pipeline's "
        "backfill asset; drops partitions of jobs finished long ago.",
    )
    def backfill_jobs_sensor(
        context: SensorEvaluationContext, config_store: ConfigStoreResource
    ) -> SensorResult:
        log = TeeLogger(backfill_logger, context.log)
        store = config_store.store
        requests: list[RunRequest] = []
        added: dict[str, list[str]] = {}
        claimed = fetch_pending_jobs(store, log)
        # Jobs claimed on an earlier tick whose run was not created (that tick failed after
        # claiming) are requested again; the run key makes a second request a no-op.
        waiting = [j for j in store.list_backfill_jobs(status=BackfillStatus.QUEUED)
                   if j.id not in {c.id for c in claimed}]
        for job in [*claimed, *waiting]:
            if job.pipeline not in config.pipelines:
                store.set_backfill_status(job.id, BackfillStatus.FAILED, error=(
                    f"Backfill job {job.id}: pipeline {job.pipeline} is not declared in "
                    f"{config.path.name}."))
                continue
            partition = str(job.id)
            added.setdefault(backfill_partitions_name(job.pipeline), []).append(partition)
            requests.append(RunRequest(
                # Attempts count executions: retrying a failed job (`rosetta backfill retry`)
                # gets a new key, a second tick for the same claim does not.
                run_key=f"backfill-{job.id}-attempt-{job.attempts + 1}",
                asset_selection=[backfill_asset_key(job.pipeline)],
                partition_key=partition,
                tags={"rosetta/backfill_job": partition, "rosetta/backfill_pipeline": job.pipeline},
            ))
            log.info("Backfill job %d (%s %s): run requested", job.id, job.pipeline, job.table_name)
        # Retention: partitions of jobs finished more than N days ago are removed so the UI
        # stays usable after thousands of jobs; the jobs stay in the config store.
        expired = store.finished_backfill_job_ids(operations.backfill_partition_retention_days)
        deletions = []
        for pipeline in config.pipelines:
            partitions_name = backfill_partitions_name(pipeline)
            existing = set(context.instance.get_dynamic_partitions(partitions_name))
            stale = sorted(existing & {str(i) for i in expired.get(pipeline, [])})
            if stale:
                deletions.append(DeleteDynamicPartitionsRequest(partitions_name, stale))
        return SensorResult(
            run_requests=requests,
            dynamic_partitions_requests=[
                AddDynamicPartitionsRequest(name, keys) for name, keys in added.items()
            ] + deletions,
        )

    return backfill_jobs_sensor
