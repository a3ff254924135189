"""Everything Rosetta puts in a Dagster code location, for one pipeline file.

Everything built (the stream jobs, checks, backfill assets and sensors) reads that same file
again when it runs, for the secrets it names, never ``$ROSETTA_CONFIG``. Used by
``rosetta_dagster.definitions`` (the workspace's module) and by the component
(``rosetta_dagster.component``).
"""

import logging
from collections.abc import Mapping
from pathlib import Path

from dagster import (
    AssetSelection,
    DefaultScheduleStatus,
    Definitions,
    EnvVar,
    ScheduleDefinition,
    define_asset_job,
)

from rosetta_dagster.core.pipeline_config import OperationsSettings, PipelineFile, config_path
from rosetta_dagster.defs.alerts.sensors import build_notification_sensor
from rosetta_dagster.defs.backfills.assets import build_backfill_asset
from rosetta_dagster.defs.backfills.sensors import build_backfill_sensor
from rosetta_dagster.defs.naming import AssetNaming, TranslateAsset
from rosetta_dagster.defs.pipelines.assets import pipeline_asset_specs
from rosetta_dagster.defs.pipelines.checks import build_pipeline_checks
from rosetta_dagster.defs.pipelines.jobs import build_stream_job, set_pipeline_status_job
from rosetta_dagster.defs.pipelines.sensors import build_operation_sensors
from rosetta_dagster.defs.platform.assets import config_db
from rosetta_dagster.defs.platform.checks import build_config_store_checks
from rosetta_dagster.defs.platform.logs import ensure_process_logging
from rosetta_dagster.defs.platform.resources import ConfigStoreResource

logger = logging.getLogger("rosetta.definitions")

config_store_upgrade_job = define_asset_job(
    "config_store_upgrade",
    selection=AssetSelection.assets(config_db),
    description="Apply pending config store migrations and report pool health.",
)


HEALTH_CHECKS_JOB = "replication_health_checks"


def health_check_schedule(interval_minutes: int) -> ScheduleDefinition:
    cron = f"*/{interval_minutes} * * * *" if interval_minutes < 60 else "0 * * * *"
    return ScheduleDefinition(
        name="replication_health_checks_schedule", job_name=HEALTH_CHECKS_JOB,
        cron_schedule=cron, default_status=DefaultScheduleStatus.RUNNING,
        description=f"Asset checks every {interval_minutes} minute(s) (health_check_interval_minutes).",
    )


def build_definitions(pipeline_file: PipelineFile | Path | None = None, *,
                      stream_run_tags: Mapping[str, str] | None = None,
                      translate: TranslateAsset | None = None) -> Definitions:
    """Everything Rosetta puts in a Dagster code location for ``pipeline_file`` (default:
    ``$ROSETTA_CONFIG``, else ``rosetta.yaml``; all of its pipelines unless it selects some).
    ``stream_run_tags``: more tags for the stream jobs' runs (e.g. for a run launcher);
    ``translate``: what becomes of each asset's default spec (key, group, tags, ...)."""
    ensure_process_logging()
    naming = AssetNaming(translate)
    if not isinstance(pipeline_file, PipelineFile):
        pipeline_file = PipelineFile((pipeline_file or config_path()).resolve())
    path = pipeline_file.path
    assets: list = [config_db]
    jobs: list = [config_store_upgrade_job, set_pipeline_status_job]
    checks: list = [build_config_store_checks(pipeline_file)]
    sensors: list = []
    if path.exists():
        config = pipeline_file.load(resolve_secrets=False)
        stream_jobs = []
        # Every asset is named before anything refers to it.
        for pipeline in config.pipelines.values():
            # A source table feeding several pipelines is one asset.
            assets.extend(
                spec for spec in pipeline_asset_specs(pipeline, naming)
                if spec.key not in {getattr(a, "key", None) for a in assets}
            )
            assets.append(build_backfill_asset(pipeline, pipeline_file, naming))
        for pipeline in config.pipelines.values():
            checks.extend(build_pipeline_checks(pipeline, pipeline_file, naming))
            stream_jobs.append(build_stream_job(pipeline, pipeline_file, stream_run_tags, naming))
        jobs.extend(stream_jobs)
        sensors.extend(build_operation_sensors(config, stream_jobs, naming))
        sensors.append(build_backfill_sensor(config, naming))
        sensors.append(build_notification_sensor(config, naming=naming))
        interval = config.operations.health_check_interval_minutes
    else:
        logger.warning("No pipeline file at %s: only platform assets are loaded", path)
        interval = OperationsSettings.health_check_interval_minutes
    # The standalone checks (parity, lag, slots, pools) without materializing anything; the
    # backfill asset's own checks run with its materializations instead.
    health_checks_job = define_asset_job(
        HEALTH_CHECKS_JOB, selection=AssetSelection.checks(*checks),
        description="Evaluate the replication and pool health checks (no materialization).",
    )
    return Definitions(
        assets=assets,
        asset_checks=checks,
        jobs=[*jobs, health_checks_job],
        sensors=sensors,
        schedules=[health_check_schedule(interval)],
        resources={"config_store": ConfigStoreResource(database_url=EnvVar("CONFIG_DATABASE_URL"))},
    )
