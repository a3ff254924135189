"""Asset specs for a pipeline's source tables (external) and destination tables."""

from dagster import AssetKey, AssetSpec

from rosetta_dagster.core.pipeline_config import Destination, PipelineDefinition, TableRef
from rosetta_dagster.defs.naming import AssetNaming, RosettaAsset


def source_table_key(pipeline: PipelineDefinition, table: TableRef) -> AssetKey:
    return AssetKey(["source", pipeline.source.name, table.schema, table.name])


def destination_table_key(destination: Destination, target: TableRef) -> AssetKey:
    """``target``: the table written in the destination (``PipelineDefinition.target``)."""
    return AssetKey(["destination", destination.name, target.schema, target.name])


def table_copy_key(pipeline: PipelineDefinition, destination: Destination, table: TableRef
                   ) -> AssetKey:
    """The asset of source ``table``'s copy in ``destination`` (its target table)."""
    return destination_table_key(destination, pipeline.target(table, destination))


def replication_slot_key(pipeline: PipelineDefinition | str) -> AssetKey:
    name = pipeline if isinstance(pipeline, str) else pipeline.name
    return AssetKey(["replication_slot", name])


def pipeline_asset_specs(pipeline: PipelineDefinition, naming: AssetNaming) -> list[AssetSpec]:
    """Source tables upstream of each destination copy, and the pipeline's slot, by pipeline
    (named by ``naming``)."""
    source = pipeline.source.name
    specs = [
        naming.spec(AssetSpec(
            replication_slot_key(pipeline),
            description=f"Replication slot {pipeline.slot_name} on source {source}; "
            "the WAL monitor records its retained WAL as observations.",
            group_name=pipeline.name,
            kinds={"postgres"},
            metadata={"rosetta/pipeline": pipeline.name, "slot_name": pipeline.slot_name},
        ), RosettaAsset("replication_slot", pipeline.name, source))
    ]
    for table in pipeline.tables:
        source_spec = naming.spec(AssetSpec(
            source_table_key(pipeline, table),
            description=f"{table.qualified} in source {source} "
            f"({pipeline.source.host}:{pipeline.source.port}/{pipeline.source.database}).",
            group_name=pipeline.name,
            kinds={"postgres"},
        ), RosettaAsset("source_table", pipeline.name, source, table.qualified))
        specs.append(source_spec)
        for destination in pipeline.destinations:
            target = pipeline.target(table, destination)
            specs.append(naming.spec(AssetSpec(
                destination_table_key(destination, target),
                deps=[source_table_key(pipeline, table)],
                description=f"{target.qualified} in destination "
                f"{destination.name}, kept in sync by the stream_{pipeline.name} job.",
                group_name=pipeline.name,
                kinds={destination.kind},
                metadata={"rosetta/pipeline": pipeline.name},
            ), RosettaAsset("destination_table", pipeline.name, source, table.qualified,
                            destination.name, target.qualified)))
    return specs
