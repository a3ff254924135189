"""Source columns that changed without a change event: looked up in the source catalog."""

from __future__ import annotations

import time
from collections.abc import Callable, MutableMapping

from rosetta_dagster.core.events import ChangeEvent
from rosetta_dagster.core.pipeline_config import PipelineDefinition, TableRef
from rosetta_dagster.core.source_rows import SourceRows
from rosetta_dagster.core.table_schema import TableSchema, read_column_types

# How often the source catalog is looked at between batches of rows.
CATALOG_POLL_S = 2.0


class CatalogWatch:
    """A schema event for each table whose columns changed on the source since its schema was
    read, from the source catalog (one query every CATALOG_POLL_S). An ADD COLUMN ... DEFAULT
    changes every existing row without any change event, and an ALTER COLUMN TYPE rewrites
    them (maybe through a USING expression); the stream says nothing of either until a row of
    the table changes, which may be never. The engines announce changed types in stream order
    with the rows that follow; this is for the tables no row of which follows.

    An added column is announced at once (rows from before it simply lack it). A changed type
    is announced once the stream has applied everything committed before the catalog showed it
    (its source time), so no row from before the change meets the new type; then the table is
    backfilled (see the writer)."""

    def __init__(self, pipeline: PipelineDefinition, schemas: MutableMapping[TableRef, TableSchema],
                 read_schema: Callable[[TableRef], TableSchema], source_rows: SourceRows) -> None:
        self.pipeline = pipeline
        self._schemas = schemas  # the session's own: updated here when a table changed
        self._read_schema = read_schema
        self._source_rows = source_rows
        self._next_poll = 0.0
        # Retyped tables, with the source time (ms) at which the catalog showed it.
        self._retyped: dict[TableRef, int] = {}

    def changed_tables(self, applied_through_ms: int | None) -> list[ChangeEvent]:
        """Schema events to apply before the next batch (usually none); ``applied_through_ms``:
        the source time the stream has applied everything up to."""
        added: list[TableRef] = []
        now = time.monotonic()
        if now >= self._next_poll:
            self._next_poll = now + CATALOG_POLL_S
            added = self._poll()
        due = [table for table, seen_ms in self._retyped.items()
               if applied_through_ms is not None and applied_through_ms >= seen_ms]
        events = []
        for table in dict.fromkeys([*added, *due]):
            self._schemas[table] = self._read_schema(table)
            self._retyped.pop(table, None)
            events.append(ChangeEvent(table, "s", None, None,
                                      source_ts_ms=int(time.time() * 1000)))
        return events

    def _poll(self) -> list[TableRef]:
        """Tables with added columns; retyped tables are noted with the source's time."""
        tables = list(self._schemas)
        conn = self._source_rows.connection()
        current = read_column_types(conn, tables)
        with conn.cursor() as cursor:
            cursor.execute("SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint")
            source_now_ms = int(cursor.fetchone()[0])  # type: ignore[index]
        added = []
        for table in tables:
            schema = self._schemas[table]
            known = schema.column_types
            columns = current.get(table, {})
            options = self.pipeline.options(table)
            # A column list publishes a new column only from the next start (then backfilled).
            listed = options.columns is not None or bool(options.exclude_columns)
            if not listed and any(name not in known and name not in schema.ignored_columns
                                  for name in columns):
                added.append(table)
            elif any(columns.get(name, kind) != kind for name, kind in known.items()):
                self._retyped.setdefault(table, source_now_ms)
        return added
