"""The sensor that turns PENDING backfill jobs into partition runs of the backfill asset."""

import logging
from collections.abc import Sequence

from dagster import (
    AddDynamicPartitionsRequest,
    AssetSelection,
    DagsterInstance,
    DagsterRunStatus,
    DefaultSensorStatus,
    DeleteDynamicPartitionsRequest,
    RunRequest,
    RunsFilter,
    SensorDefinition,
    SensorEvaluationContext,
    SensorResult,
    sensor,
)

from rosetta_dagster.core.backfill import fail_abandoned_job, fetch_pending_jobs
from rosetta_dagster.core.config_store import BackfillStatus
from rosetta_dagster.defs.backfills.assets import backfill_asset_key, backfill_partitions_name
from rosetta_dagster.defs.platform.logs import TeeLogger
from rosetta_dagster.defs.platform.resources import ConfigStoreResource
from rosetta_dagster.defs.replication_set import ReplicationSet, operations_of

backfill_logger = logging.getLogger("rosetta.backfill")
JOB_TAG = "rosetta/backfill_job"
# A run in these has not ended (or is ending): its job's status is its own to record.
UNFINISHED_RUN_STATUSES = [DagsterRunStatus.QUEUED, DagsterRunStatus.NOT_STARTED,
                           DagsterRunStatus.STARTING, DagsterRunStatus.STARTED,
                           DagsterRunStatus.CANCELING]


def jobs_with_unfinished_runs(instance: DagsterInstance) -> set[int]:
    """Backfill jobs a run is (or may be) executing: by the sensor's tag, or the partition of a
    run started by hand from the UI (job ids are the partition keys)."""
    jobs = set()
    for record in instance.get_run_records(RunsFilter(statuses=UNFINISHED_RUN_STATUSES)):
        tags = record.dagster_run.tags
        for tag in (JOB_TAG, "dagster/partition"):
            if tags.get(tag, "").isdigit():
                jobs.add(int(tags[tag]))
    return jobs


def build_backfill_sensor(sets: Sequence[ReplicationSet]) -> SensorDefinition:
    """Once per code location, for the pipelines of every set (each backfill asset named by
    its set's naming)."""
    operations = operations_of(sets)
    # The pipelines the definitions were built for, and their backfill assets' keys.
    keys = {name: replication_set.naming.key(backfill_asset_key(name))
            for replication_set in sets
            for name in replication_set.declared_pipelines()}
    # A code location running every pipeline of its one file claims any job (and fails those
    # of undeclared pipelines); otherwise only the jobs of its pipelines.
    claimable = (None if len(sets) == 1 and sets[0].file.selected is None
                 else frozenset(keys))
    files = ", ".join(s.file.path.name for s in sets)

    @sensor(
        name="backfill_jobs_sensor",
        asset_selection=AssetSelection.assets(*keys.values()),
        minimum_interval_seconds=operations.backfill_sensor_interval_seconds,
        default_status=DefaultSensorStatus.RUNNING,
        description="Claims PENDING backfill jobs and runs each as a partition of its pipeline's "
        "backfill asset; fails EXECUTING jobs whose run ended without saying how; drops "
        "partitions of jobs finished long ago.",
    )
    def backfill_jobs_sensor(
        context: SensorEvaluationContext, config_store: ConfigStoreResource
    ) -> SensorResult:
        log = TeeLogger(backfill_logger, context.log)
        store = config_store.store
        # Read before the runs: a job that starts executing after this read is not judged.
        executing = store.list_backfill_jobs(status=BackfillStatus.EXECUTING)
        running = jobs_with_unfinished_runs(context.instance)
        for job in executing:
            if job.id not in running and job.pipeline in keys:
                fail_abandoned_job(store, job, log)
        requests: list[RunRequest] = []
        added: dict[str, list[str]] = {}
        claimed = fetch_pending_jobs(store, log, pipelines=claimable)
        # Jobs claimed on an earlier tick whose run was not created (that tick failed after
        # claiming) are requested again; the run key makes a second request a no-op.
        waiting = [j for j in store.list_backfill_jobs(status=BackfillStatus.QUEUED)
                   if j.id not in {c.id for c in claimed}
                   and (claimable is None or j.pipeline in claimable)]
        for job in [*claimed, *waiting]:
            if job.pipeline not in keys:
                store.set_backfill_status(job.id, BackfillStatus.FAILED, error=(
                    f"Backfill job {job.id}: pipeline {job.pipeline} is not declared in "
                    f"{files}."))
                continue
            partition = str(job.id)
            added.setdefault(backfill_partitions_name(job.pipeline), []).append(partition)
            requests.append(RunRequest(
                # Attempts count executions: retrying a failed job (`rosetta backfill retry`)
                # gets a new key, a second tick for the same claim does not.
                run_key=f"backfill-{job.id}-attempt-{job.attempts + 1}",
                asset_selection=[keys[job.pipeline]],
                partition_key=partition,
                tags={JOB_TAG: partition, "rosetta/backfill_pipeline": job.pipeline},
            ))
            log.info("Backfill job %d (%s %s): run requested", job.id, job.pipeline, job.table_name)
        # Retention: partitions of jobs finished more than N days ago are removed so the UI
        # stays usable after thousands of jobs; the jobs stay in the config store.
        expired = store.finished_backfill_job_ids(operations.backfill_partition_retention_days)
        deletions = []
        for pipeline in keys:
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
