"""Source columns that changed without a change event: looked up in the source catalog."""

from __future__ import annotations

import time
from collections.abc import Callable, MutableMapping

from rosetta_dagster.core.apply.schema import TableSchema, read_column_types
from rosetta_dagster.core.capture import CaptureBatch
from rosetta_dagster.core.events import ChangeEvent
from rosetta_dagster.core.pipeline_config import PipelineDefinition, TableRef
from rosetta_dagster.core.source_rows import SourceRows

# How often the source catalog is looked at for added columns between batches of rows.
CATALOG_POLL_S = 2.0


class CatalogWatch:
    """A schema event for each table that got columns on the source since its schema was
    read, from the source catalog (one query every CATALOG_POLL_S): an ADD COLUMN ... DEFAULT
    changes every existing row without any change event, and the stream sends nothing of the
    table until one of its rows changes. (Changed column types come from the engines, in
    stream order.)"""

    def __init__(self, pipeline: PipelineDefinition, schemas: MutableMapping[TableRef, TableSchema],
                 read_schema: Callable[[TableRef], TableSchema], source_rows: SourceRows) -> None:
        self.pipeline = pipeline
        self._schemas = schemas  # the session's own: updated here when a table changed
        self._read_schema = read_schema
        self._source_rows = source_rows
        self._next_poll = 0.0

    def changed_tables(self, batch: CaptureBatch) -> list[ChangeEvent]:
        """Schema events to apply before ``batch`` (usually none)."""
        now = time.monotonic()
        if now < self._next_poll:
            return []
        self._next_poll = now + CATALOG_POLL_S
        tables = list(self._schemas)
        current = read_column_types(self._source_rows.connection(), tables)
        events = []
        for table in tables:
            schema = self._schemas[table]
            known = schema.column_types
            columns = current.get(table, {})
            options = self.pipeline.options(table)
            # A column list publishes a new column only from the next start (then backfilled).
            listed = options.columns is not None or bool(options.exclude_columns)
            added = not listed and any(name not in known and name not in schema.ignored_columns
                                       for name in columns)
            if added:
                self._schemas[table] = self._read_schema(table)
                events.append(ChangeEvent(table, "s", None, None,
                                          source_ts_ms=int(time.time() * 1000)))
        return events
