"""Checks on the config store asset: the checklist's connection-pool alert thresholds."""

from collections.abc import Iterator, Sequence

from dagster import (
    AssetCheckResult,
    AssetChecksDefinition,
    AssetCheckSpec,
    AssetKey,
    multi_asset_check,
)

from rosetta_dagster.core.health import evaluate_config_store
from rosetta_dagster.core.pipeline_config import OperationsSettings
from rosetta_dagster.defs.pipelines.checks import check_result
from rosetta_dagster.defs.platform.resources import ConfigStoreResource
from rosetta_dagster.defs.replication_set import ReplicationSet

CONFIG_DB_KEY = AssetKey(["config_db"])
POOL_CHECKS = ("pool_utilisation", "server_connections", "closed_connection_errors",
               "pool_initialised")


def build_config_store_checks(sets: Sequence[ReplicationSet]) -> AssetChecksDefinition:
    """The pool checks: the thresholds of the first set's file (the defaults without one), the
    servers of every set's pipelines."""

    @multi_asset_check(
        specs=[AssetCheckSpec(name, asset=CONFIG_DB_KEY) for name in POOL_CHECKS],
        name="config_store_pool_health",
        description="Each pool's utilisation, sessions against max_connections on every server, "
                    "closed/dead connections, pool initialisation retries.",
    )
    def config_store_pool_health(config_store: ConfigStoreResource) -> Iterator[AssetCheckResult]:
        loaded = [s.file.load() for s in sets if s.file.path.exists()]
        operations = loaded[0].operations if loaded else OperationsSettings()
        pipelines = [pipeline for config in loaded for pipeline in config.pipelines.values()]
        for outcome in evaluate_config_store(config_store.store, operations, pipelines):
            yield check_result(outcome, CONFIG_DB_KEY)

    return config_store_pool_health
