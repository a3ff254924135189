"""Dagster definitions of Rosetta (``dagster dev -w workspace.yaml`` loads ``defs``).

Pipelines come from ``rosetta.yaml`` (or ``$ROSETTA_CONFIG``); without that file only the
platform assets load.
"""

import logging

from dagster import AssetSelection, Definitions, EnvVar, define_asset_job

from rosetta_dagster.core.pipeline_config import config_path, load_config
from rosetta_dagster.defs.pipelines.assets import pipeline_asset_specs
from rosetta_dagster.defs.pipelines.checks import build_slot_checks
from rosetta_dagster.defs.pipelines.jobs import build_stream_job, set_pipeline_status_job
from rosetta_dagster.defs.pipelines.sensors import build_operation_sensors
from rosetta_dagster.defs.platform.assets import config_db
from rosetta_dagster.defs.platform.logs import ensure_process_logging
from rosetta_dagster.defs.platform.resources import ConfigStoreResource

logger = logging.getLogger("rosetta.definitions")

config_store_upgrade_job = define_asset_job(
    "config_store_upgrade",
    selection=AssetSelection.assets(config_db),
    description="Apply pending config store migrations and report pool health.",
)


def build_definitions() -> Definitions:
    ensure_process_logging()
    assets: list = [config_db]
    jobs: list = [config_store_upgrade_job, set_pipeline_status_job]
    checks: list = []
    sensors: list = []
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
            checks.extend(build_slot_checks(pipeline))
            stream_jobs.append(build_stream_job(pipeline))
        jobs.extend(stream_jobs)
        sensors.extend(build_operation_sensors(config, stream_jobs))
    else:
        logger.warning("No pipeline file at %s: only platform assets are loaded", path)
    return Definitions(
        assets=assets,
        asset_checks=checks,
        jobs=jobs,
        sensors=sensors,
        resources={"config_store": ConfigStoreResource(database_url=EnvVar("CONFIG_DATABASE_URL"))},
    )


defs = build_definitions()
