"""Dagster definitions of Rosetta (``dagster dev -w workspace.yaml`` loads ``defs``).

Pipelines come from ``rosetta.yaml`` (or ``$ROSETTA_CONFIG``); without that file only the
platform assets load.
"""

import logging

from dagster import (
    AssetChecksDefinition,
    AssetSelection,
    DefaultScheduleStatus,
    Definitions,
    EnvVar,
    ScheduleDefinition,
    define_asset_job,
)
from dagster._core.definitions.unresolved_asset_job_definition import UnresolvedAssetJobDefinition

from rosetta_dagster.core.pipeline_config import OperationsSettings, config_path, load_config
from rosetta_dagster.defs.alerts.sensors import build_notification_sensor
from rosetta_dagster.defs.backfills.assets import build_backfill_asset
from rosetta_dagster.defs.backfills.sensors import build_backfill_sensor
from rosetta_dagster.defs.pipelines.assets import pipeline_asset_specs
from rosetta_dagster.defs.pipelines.checks import build_pipeline_checks
from rosetta_dagster.defs.pipelines.jobs import build_stream_job, set_pipeline_status_job
from rosetta_dagster.defs.pipelines.sensors import build_operation_sensors
from rosetta_dagster.defs.platform.assets import config_db
from rosetta_dagster.defs.platform.checks import config_store_pool_health
from rosetta_dagster.defs.platform.logs import ensure_process_logging
from rosetta_dagster.defs.platform.resources import ConfigStoreResource

logger = logging.getLogger("rosetta.definitions")

config_store_upgrade_job = define_asset_job(
    "config_store_upgrade",
    selection=AssetSelection.assets(config_db),
    description="Apply pending config store migrations and report pool health.",
)


HEALTH_CHECKS_JOB = "replication_health_checks"


def build_health_checks_job(checks: list[AssetChecksDefinition]) -> UnresolvedAssetJobDefinition:
    """The standalone checks (parity, lag, slots, pools) without materializing anything; the
    backfill asset's own checks run with its materializations instead."""
    return define_asset_job(
        HEALTH_CHECKS_JOB,
        selection=AssetSelection.checks(*checks),
        description="Evaluate the replication and pool health checks (no materialization).",
    )


def health_check_schedule(
    job: UnresolvedAssetJobDefinition, interval_minutes: int
) -> ScheduleDefinition:
    cron = f"*/{interval_minutes} * * * *" if interval_minutes < 60 else "0 * * * *"
    return ScheduleDefinition(
        name="replication_health_checks_schedule", job=job, cron_schedule=cron,
        default_status=DefaultScheduleStatus.RUNNING,
        description=f"Asset checks every {interval_minutes} minute(s) (health_check_interval_minutes).",
    )


def build_definitions() -> Definitions:
    ensure_process_logging()
    assets: list = [config_db]
    jobs: list = [config_store_upgrade_job, set_pipeline_status_job]
    checks: list = [config_store_pool_health]
    sensors: list = []
    schedules: list = []
    path = config_path()
    if path.exists():
        config = load_config(path, resolve_secrets=False)
        stream_jobs = []
        for pipeline in config.pipelines.values():
            # A source table feeding several pipelines is one asset.
            assets.extend(
                spec for spec in pipeline_asset_specs(pipeline)
                if spec.key not in {getattr(a, "key", None) for a in assets}
            )
            checks.extend(build_pipeline_checks(pipeline))
            stream_jobs.append(build_stream_job(pipeline))
            assets.append(build_backfill_asset(pipeline))
        jobs.extend(stream_jobs)
        sensors.extend(build_operation_sensors(config, stream_jobs))
        sensors.append(build_backfill_sensor(config))
        sensors.append(build_notification_sensor(config))
        interval = config.operations.health_check_interval_minutes
    else:
        logger.warning("No pipeline file at %s: only platform assets are loaded", path)
        interval = OperationsSettings.health_check_interval_minutes
    health_checks_job = build_health_checks_job(checks)
    schedules.append(health_check_schedule(health_checks_job, interval))
    return Definitions(
        assets=assets,
        asset_checks=checks,
        jobs=[*jobs, health_checks_job],
        sensors=sensors,
        schedules=schedules,
        resources={"config_store": ConfigStoreResource(database_url=EnvVar("CONFIG_DATABASE_URL"))},
    )


defs = build_definitions()
