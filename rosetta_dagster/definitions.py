"""Dagster definitions of Rosetta (``dagster dev -w workspace.yaml`` loads ``defs``).

Pipelines come from ``rosetta.yaml`` (or ``$ROSETTA_CONFIG``); without that file only the
platform assets load.
"""

import logging

from dagster import AssetSelection, Definitions, EnvVar, define_asset_job

from rosetta_dagster.core.pipeline_config import config_path, load_config
from rosetta_dagster.defs.pipelines.assets import pipeline_asset_specs
from rosetta_dagster.defs.pipelines.jobs import build_stream_job
from rosetta_dagster.defs.platform.assets import config_db
from rosetta_dagster.defs.platform.resources import ConfigStoreResource

logger = logging.getLogger("rosetta.definitions")

config_store_upgrade_job = define_asset_job(
    "config_store_upgrade",
    selection=AssetSelection.assets(config_db),
    description="Apply pending config store migrations and report pool health.",
)


def build_definitions() -> Definitions:
    assets: list = [config_db]
    jobs: list = [config_store_upgrade_job]
    path = config_path()
    if path.exists():
        for pipeline in load_config(path, resolve_secrets=False).pipelines.values():
            assets.extend(pipeline_asset_specs(pipeline))
            jobs.append(build_stream_job(pipeline))
    else:
        logger.warning("No pipeline file at %s: only platform assets are loaded", path)
    return Definitions(
        assets=assets,
        jobs=jobs,
        resources={"config_store": ConfigStoreResource(database_url=EnvVar("CONFIG_DATABASE_URL"))},
    )


defs = build_definitions()
