"""Everything Rosetta puts in a Dagster code location: each replication set's assets, checks and
stream jobs, and the platform part once.

Everything built (the stream jobs, checks, backfill assets and sensors) reads its pipeline file
again when it runs, for the secrets it names, never ``$ROSETTA_CONFIG``. Used by
``rosetta_dagster.definitions`` (the workspace's module, one pipeline file) and by the component
(``rosetta_dagster.component``, a set per instance).
"""

import logging
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path

from dagster import (
    AssetSelection,
    DefaultScheduleStatus,
    Definitions,
    EnvVar,
    ScheduleDefinition,
    define_asset_job,
)

from rosetta_dagster.core.pipeline_config import PipelineFile, config_path
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
from rosetta_dagster.defs.replication_set import (
    ReplicationSet,
    operations_of,
    refuse_shared_pipelines,
)

logger = logging.getLogger("rosetta.definitions")

config_store_upgrade_job = define_asset_job(
    "config_store_upgrade",
    selection=AssetSelection.assets(config_db),
    description="Apply pending config store migrations and report pool health.",
)


HEALTH_CHECKS_JOB = "replication_health_checks"
# One object, so that the definitions of several component instances merge.
CONFIG_STORE = ConfigStoreResource(database_url=EnvVar("CONFIG_DATABASE_URL"))


def health_check_schedule(interval_minutes: int) -> ScheduleDefinition:
    cron = f"*/{interval_minutes} * * * *" if interval_minutes < 60 else "0 * * * *"
    return ScheduleDefinition(
        name="replication_health_checks_schedule", job_name=HEALTH_CHECKS_JOB,
        cron_schedule=cron, default_status=DefaultScheduleStatus.RUNNING,
        description=f"Asset checks every {interval_minutes} minute(s) (health_check_interval_minutes).",
    )


_built: weakref.WeakKeyDictionary[ReplicationSet, Definitions] = weakref.WeakKeyDictionary()


def replication_set_definitions(replication_set: ReplicationSet) -> Definitions:
    """One set's assets and checks, built once (the platform part selects its checks, and
    naming its assets fills the naming every runtime event asks)."""
    built = _built.get(replication_set)
    if built is not None:
        return built
    naming, pipeline_file = replication_set.naming, replication_set.file
    pipelines = replication_set.declared_pipelines().values()
    assets: list = []
    # Every asset is named before anything refers to it.
    for pipeline in pipelines:
        # A source table feeding several pipelines is one asset.
        assets.extend(spec for spec in pipeline_asset_specs(pipeline, naming)
                      if spec.key not in {getattr(a, "key", None) for a in assets})
        assets.append(build_backfill_asset(pipeline, pipeline_file, naming))
    built = Definitions(
        assets=assets,
        asset_checks=[check for pipeline in pipelines
                      for check in build_pipeline_checks(pipeline, pipeline_file, naming)],
    )
    _built[replication_set] = built
    return built


def build_platform_definitions(sets: Sequence[ReplicationSet]) -> Definitions:
    """What a code location has once, whatever it replicates: ``config_db`` and its checks, the
    operating jobs, every set's stream jobs, the sensors and the health-check schedule. (The
    stream jobs are here, with the supervisor that launches them: Dagster copies each
    component's definitions, so a sensor can only target jobs of its own component.)"""
    refuse_shared_pipelines(sets)
    present = [s for s in sets if s.file.path.exists()]
    parts = [replication_set_definitions(s) for s in present]
    stream_jobs = [
        build_stream_job(pipeline, s.file, s.stream_run_tags, s.naming)
        for s in present for pipeline in s.declared_pipelines().values()]
    checks = [build_config_store_checks(present),
              *[check for part in parts for check in part.asset_checks or []]]
    sensors = []
    if present:
        sensors = [*build_operation_sensors(present, stream_jobs),
                   build_backfill_sensor(present),
                   build_notification_sensor(present)]
    # The standalone checks (parity, lag, slots, pools) without materializing anything; the
    # backfill asset's own checks run with its materializations instead.
    health_checks_job = define_asset_job(
        HEALTH_CHECKS_JOB, selection=AssetSelection.checks(*checks),
        description="Evaluate the replication and pool health checks (no materialization).",
    )
    interval = operations_of(present).health_check_interval_minutes
    return Definitions(
        assets=[config_db],
        asset_checks=checks[:1],
        jobs=[config_store_upgrade_job, set_pipeline_status_job, *stream_jobs, health_checks_job],
        sensors=sensors,
        schedules=[health_check_schedule(interval)],
        resources={"config_store": CONFIG_STORE},
    )


def build_definitions(pipeline_file: PipelineFile | Path | None = None, *,
                      stream_run_tags: Mapping[str, str] | None = None,
                      translate: TranslateAsset | None = None) -> Definitions:
    """Everything Rosetta puts in a Dagster code location for ``pipeline_file`` (default:
    ``$ROSETTA_CONFIG``, else ``rosetta.yaml``; all of its pipelines unless it selects some).
    ``stream_run_tags``: more tags for the stream jobs' runs (e.g. for a run launcher);
    ``translate``: what becomes of each asset's default spec (key, group, tags, ...)."""
    ensure_process_logging()
    if not isinstance(pipeline_file, PipelineFile):
        pipeline_file = PipelineFile((pipeline_file or config_path()).resolve())
    if not pipeline_file.path.exists():
        logger.warning("No pipeline file at %s: only platform assets are loaded",
                       pipeline_file.path)
    replication_set = ReplicationSet(pipeline_file, AssetNaming(translate),
                                     dict(stream_run_tags or {}))
    return Definitions.merge(replication_set_definitions(replication_set),
                             build_platform_definitions([replication_set]))
