"""Checks on the config store asset: the checklist's connection-pool alert thresholds."""

from collections.abc import Iterator

from dagster import (
    AssetCheckResult,
    AssetChecksDefinition,
    AssetCheckSpec,
    AssetKey,
    multi_asset_check,
)

from rosetta_dagster.core.health import evaluate_config_store
from rosetta_dagster.core.pipeline_config import OperationsSettings, PipelineFile
from rosetta_dagster.defs.pipelines.checks import check_result
from rosetta_dagster.defs.platform.resources import ConfigStoreResource

CONFIG_DB_KEY = AssetKey(["config_db"])
POOL_CHECKS = ("pool_utilisation", "server_connections", "closed_connection_errors",
               "pool_initialised")


def build_config_store_checks(pipeline_file: PipelineFile) -> AssetChecksDefinition:
    """The pool checks, with the thresholds and servers of ``pipeline_file`` (what the
    definitions were built from) when it exists, the defaults otherwise."""

    @multi_asset_check(
        specs=[AssetCheckSpec(name, asset=CONFIG_DB_KEY) for name in POOL_CHECKS],
        name="config_store_pool_health",
        description="Each pool's utilisation, sessions against max_connections on every server, "
                    "closed/dead connections, pool initialisation retries.",
    )
    def config_store_pool_health(config_store: ConfigStoreResource) -> Iterator[AssetCheckResult]:
        config = pipeline_file.load() if pipeline_file.path.exists() else None
        operations = config.operations if config is not None else OperationsSettings()
        pipelines = list(config.pipelines.values()) if config is not None else []
        for outcome in evaluate_config_store(config_store.store, operations, pipelines):
            yield check_result(outcome, CONFIG_DB_KEY)

    return config_store_pool_health
