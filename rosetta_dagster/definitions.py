"""Dagster definitions of Rosetta (``dagster dev -w workspace.yaml`` loads ``defs``)."""


from dagster import AssetSelection, Definitions, EnvVar, define_asset_job

from rosetta_dagster.defs.platform.assets import config_db
from rosetta_dagster.defs.platform.resources import ConfigStoreResource

config_store_upgrade_job = define_asset_job(
    "config_store_upgrade",
    selection=AssetSelection.assets(config_db),
    description="Apply pending config store migrations and report pool health.",
)

defs = Definitions(
    assets=[config_db],
    jobs=[config_store_upgrade_job],
    resources={"config_store": ConfigStoreResource(database_url=EnvVar("CONFIG_DATABASE_URL"))},
)
