"""Column type changes for the Debezium engine, which does not announce them (pgoutput's
relation messages do): the source catalog is compared with the types seen before."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import psycopg2.extensions

from rosetta_dagster.core.events import ChangeEvent, Watermark
from rosetta_dagster.core.pipeline_config import TableRef
from rosetta_dagster.core.table_schema import TableSchema, read_column_types


class TypeWatch:
    """With each batch of streamed rows, one catalog query; a schema event ("s") goes before
    the batch's first streamed change for each table whose column changed type, as the
    pgoutput engine emits it. Rows of the batch from before the change are then applied in the
    new types; the backfill the change causes repairs them with the rest. Snapshot batches are
    left alone (the snapshot reads the current types)."""

    def __init__(self, schemas: Mapping[TableRef, TableSchema]) -> None:
        self._known = {table: dict(schema.column_types) for table, schema in schemas.items()}
        self._ignored = {table: schema.ignored_columns for table, schema in schemas.items()}

    def with_schema_events(self, source: psycopg2.extensions.connection,
                           items: Sequence[ChangeEvent | Watermark]
                           ) -> Sequence[ChangeEvent | Watermark]:
        first = next((index for index, item in enumerate(items)
                      if isinstance(item, ChangeEvent) and not item.from_snapshot), None)
        if first is None:
            return items
        tables = list(self._known)
        current = read_column_types(source, tables)
        retyped = []
        for table in tables:
            columns = {name: kind for name, kind in current.get(table, {}).items()
                       if name not in self._ignored[table]}
            known = self._known[table]
            if any(name in known and known[name] != kind for name, kind in columns.items()):
                retyped.append(table)
            self._known[table] = columns  # added columns are watched from now on
        if not retyped:
            return items
        now_ms = int(time.time() * 1000)
        events = [ChangeEvent(table, "s", None, None, source_ts_ms=now_ms) for table in retyped]
        return [*items[:first], *events, *items[first:]]
