"""Checks on the config store asset: the checklist's connection-pool alert thresholds."""

from collections.abc import Iterator

from dagster import AssetCheckResult, AssetCheckSpec, AssetKey, multi_asset_check

from rosetta_dagster.core.health import evaluate_config_store
from rosetta_dagster.core.pipeline_config import OperationsSettings, config_path, load_config
from rosetta_dagster.defs.pipelines.checks import check_result
from rosetta_dagster.defs.platform.resources import ConfigStoreResource

CONFIG_DB_KEY = AssetKey(["config_db"])
POOL_CHECKS = ("pool_utilisation", "closed_connection_errors", "pool_initialised")


def _operations() -> OperationsSettings:
    path = config_path()
    return load_config(path, resolve_secrets=False).operations if path.exists() else OperationsSettings()


@multi_asset_check(
    specs=[AssetCheckSpec(name, asset=CONFIG_DB_KEY) for name in POOL_CHECKS],
    name="config_store_pool_health",
    description="Connections to config_db, closed/dead connections, pool initialisation retries.",
)
def config_store_pool_health(config_store: ConfigStoreResource) -> Iterator[AssetCheckResult]:
    for outcome in evaluate_config_store(config_store.store, _operations()):
        yield check_result(outcome, CONFIG_DB_KEY)
