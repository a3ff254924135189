"""Checks before a stream starts: what it refuses to stream (one sentence naming every
offending table and column, before anything is written) and stored positions it must forget."""

from __future__ import annotations

from collections.abc import Mapping

import psycopg2.extensions

from rosetta_dagster.core.capture import CaptureEngine, PositionStore
from rosetta_dagster.core.config_store import ConfigStore
from rosetta_dagster.core.events import format_lsn
from rosetta_dagster.core.pipeline_config import PipelineDefinition, TableRef
from rosetta_dagster.core.replication import (
    Log,
    delete_stale_offset,
    destination_connection,
    missing_slot_reason,
    slot_confirmed_lsn,
    slot_exists,
)
from rosetta_dagster.core.table_schema import Column, SchemaError, TableSchema, read_table_schema

STALE_OFFSET_ERROR = "no longer available on the server"


def read_schemas(pipeline: PipelineDefinition, source: psycopg2.extensions.connection
                 ) -> dict[TableRef, TableSchema]:
    """Every table's schema; what makes any of them unreplicable (missing, no replica identity, an
    option naming a column it lacks) is refused for all of them in one sentence."""
    where = f"source {pipeline.source.name}"
    schemas: dict[TableRef, TableSchema] = {}
    refused: list[SchemaError] = []
    for table in pipeline.tables:
        try:
            schemas[table] = read_table_schema(source, table, where, pipeline.options(table))
        except SchemaError as exc:
            refused.append(exc)
    if len(refused) == 1:
        raise refused[0]
    if refused:
        reasons = "; ".join(str(exc).removesuffix(".").removesuffix(", so nothing was written")
                            for exc in refused)
        raise SchemaError(f"Pipeline {pipeline.name} cannot stream {len(refused)} of its tables, "
                          f"so nothing was written: {reasons}.")
    return schemas


def refuse_unstreamable(pipeline: PipelineDefinition, engine: CaptureEngine,
                        schemas: Mapping[TableRef, TableSchema],
                        source: psycopg2.extensions.connection) -> None:
    """Raise SchemaError when the pipeline cannot be streamed exactly with its engine."""
    _refuse_keyless(pipeline, schemas)
    _refuse_snapshot_keys(pipeline, engine, schemas)
    _refuse_unsupported_columns(pipeline, engine, schemas)
    if (reason := engine.source_refusal(source)) is not None:
        raise SchemaError(f"Pipeline {pipeline.name} cannot stream source "
                          f"{pipeline.source.name} with the {engine.name} "
                          f"engine, so nothing was written: {reason}.")
    _refuse_money_across_locales(pipeline, schemas, source)


def _refuse_unsupported_columns(pipeline: PipelineDefinition, engine: CaptureEngine,
                                schemas: Mapping[TableRef, TableSchema]) -> None:
    """Every column the engine cannot carry exactly, of every table, in one sentence."""
    refused = [
        f"{schema.table.qualified}.{column.name} ({column.type_sql}): {reason}"
        for schema in schemas.values() for column in schema.columns
        if (reason := _column_refusal(engine, schema, column)) is not None
    ]
    if refused:
        raise SchemaError(
            f"Pipeline {pipeline.name} cannot replicate these columns exactly with the "
            f"{engine.name} engine, so nothing was written: {'; '.join(refused)}."
        )


def _column_refusal(engine: CaptureEngine, schema: TableSchema, column: Column) -> str | None:
    reason = engine.values.refusal(column, column.name in schema.key_columns)
    if reason is None and schema.keyless and engine.values.always_reread(column):
        reason = (f"the {engine.name} engine does not carry its values exactly (they are "
                  "re-read from the source by key), and the table has no key; give it one (a "
                  "primary key or REPLICA IDENTITY USING INDEX) or leave the column out with "
                  "exclude_columns")
    return reason


def _refuse_keyless(pipeline: PipelineDefinition, schemas: Mapping[TableRef, TableSchema]
                    ) -> None:
    """Tables without a key need a re-snapshot that copies them whole (one through the engine
    finds the rows it did not deliver by key)."""
    keyless = ", ".join(s.table.qualified for s in schemas.values() if s.keyless)
    if keyless and pipeline.settings.initial_load != "copy":
        raise SchemaError(
            f"Pipeline {pipeline.name} loads with initial_load: "
            f"{pipeline.settings.initial_load}, which needs a key in every table, and "
            f"{keyless} have none; use initial_load: copy, so nothing was written.")


def _refuse_snapshot_keys(pipeline: PipelineDefinition, engine: CaptureEngine,
                          schemas: Mapping[TableRef, TableSchema]) -> None:
    """A key column whose values the engine's snapshot cannot tell apart (Debezium: a BC
    date read as AD) leaves nothing to read the right value back by."""
    if pipeline.settings.initial_load == "copy":
        return
    columns = [f"{schema.table.qualified}.{name}" for schema in schemas.values()
               for name in schema.key_columns
               if engine.values.reread_in_snapshot(schema.column(name))]
    if columns:
        raise SchemaError(
            f"Pipeline {pipeline.name} loads with initial_load: "
            f"{pipeline.settings.initial_load}, whose snapshot reads a date without its era "
            f"(a BC date as AD), and {', '.join(columns)} is a key column of type date, which "
            "the stream could not then read back from the source; use initial_load: copy, so "
            "nothing was written.")


def _refuse_money_across_locales(pipeline: PipelineDefinition,
                                 schemas: Mapping[TableRef, TableSchema],
                                 source: psycopg2.extensions.connection) -> None:
    """money is an integer whose text (and meaning: cents or yen) follows lc_monetary: it is
    only carried between databases that use the same lc_monetary."""
    columns = [f"{schema.table.qualified}.{column.name}" for schema in schemas.values()
               for column in schema.columns if column.type_ref and column.type_ref.uses("money")]
    if not columns:
        return
    source_locale = _lc_monetary(source)
    for destination in pipeline.destinations:
        if destination.kind != "postgres":
            continue  # kept as the source's text
        with destination_connection(pipeline, destination) as target:
            target_locale = _lc_monetary(target)
        if target_locale != source_locale:
            raise SchemaError(
                f"Pipeline {pipeline.name} cannot replicate money columns "
                f"({', '.join(columns)}) exactly: lc_monetary is {source_locale} on source "
                f"{pipeline.source.name} and {target_locale} on destination "
                f"{destination.name}, so the same amount would mean another value; use the "
                "same lc_monetary on both, so nothing was written."
            )


def _lc_monetary(conn: psycopg2.extensions.connection) -> str:
    with conn.cursor() as cursor:
        cursor.execute("SHOW lc_monetary")
        row = cursor.fetchone()
    return str(row[0]) if row else ""


def forget_stale_position(pipeline: PipelineDefinition, positions: PositionStore,
                          source: psycopg2.extensions.connection,
                          config_store: ConfigStore | None, log: Log) -> None:
    """A stored position whose slot is gone, or that its slot has moved past (the changes in
    between are lost), is deleted: the pipeline then loads afresh."""
    if not slot_exists(source, pipeline.slot_name):
        delete_stale_offset(pipeline, positions, reason=missing_slot_reason(pipeline),
                            config_store=config_store, log=log)
        return
    confirmed = slot_confirmed_lsn(source, pipeline.slot_name)
    if confirmed is None or not positions.exists():
        return
    behind = positions.behind_slot(confirmed)
    if behind is not None:
        delete_stale_offset(
            pipeline, positions,
            reason=(f"the last recorded offset ({format_lsn(behind)}) is "
                    f"{STALE_OFFSET_ERROR} (slot {pipeline.slot_name} starts at "
                    f"{format_lsn(confirmed)})"),
            config_store=config_store, log=log,
        )
