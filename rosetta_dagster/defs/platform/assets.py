"""The config store as an asset: materializing it applies migrations and reports pool health."""


from dagster import AssetExecutionContext, MaterializeResult, MetadataValue, asset

from rosetta_dagster.defs.platform.resources import ConfigStoreResource


@asset(
    group_name="platform",
    kinds={"postgres"},
    description="Rosetta's config store (config_db): pipelines, backfill jobs and monitor state.",
)
def config_db(context: AssetExecutionContext, config_store: ConfigStoreResource) -> MaterializeResult:
    store = config_store.store
    applied = store.upgrade()
    stats = config_store.stats()
    pipelines = store.list_pipelines()
    context.log.info(
        "Config store at schema version %d (%d migrations applied now), %d pipelines",
        store.schema_version(),
        len(applied),
        len(pipelines),
    )
    return MaterializeResult(
        metadata={
            "schema_version": MetadataValue.int(store.schema_version()),
            "migrations_applied": MetadataValue.int(len(applied)),
            "pipelines": MetadataValue.int(len(pipelines)),
            "pool_max_conn": MetadataValue.int(stats.max_conn),
            "pool_in_use": MetadataValue.int(stats.in_use),
            "pool_init_attempts": MetadataValue.int(stats.init_attempts),
            "pool_dead_connections_detected": MetadataValue.int(stats.dead_detected),
        }
    )
