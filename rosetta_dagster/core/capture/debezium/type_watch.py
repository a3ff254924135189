"""Column type changes for the Debezium engine, which does not announce them (pgoutput's
relation messages do): the source catalog is compared with the types seen before."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import psycopg2.extensions

from rosetta_dagster.core.events import ChangeEvent, Watermark
from rosetta_dagster.core.pipeline_config import TableRef
from rosetta_dagster.core.table_schema import TableSchema, read_column_types

# A change record's schema token: the identity of the value schema Debezium built for its
# table (see DebeziumCapture). Debezium builds a new one when a relation message describes the
# table differently, and pgoutput sends one before the first change after an ALTER TABLE.
SchemaTokens = Mapping[TableRef, Sequence[int]]
# However steady the tokens, the catalog is read at least this often while changes stream.
CATALOG_RECHECK_S = 30.0


class TypeWatch:
    """A schema event ("s") goes before a batch's first streamed change for each table whose
    column changed type, as the pgoutput engine emits it. Rows of the batch from before the
    change are then applied in the new types; the backfill the change causes repairs them with
    the rest. Snapshot batches are left alone (the snapshot reads the current types).

    The source catalog is read when a batch brings a table's schema token not seen before (the
    first batch, and after Debezium rebuilt the table's schema), not with every batch: at
    hundreds of small batches a second the query was a third of the handler's time. It is
    also read once ``recheck_s`` passed since the last reading, so that a change the tokens
    did not show (two schema objects with the same identity hash) is still found, late, and
    repaired by the backfill it causes."""

    def __init__(self, schemas: Mapping[TableRef, TableSchema], *,
                 recheck_s: float = CATALOG_RECHECK_S) -> None:
        self._known = {table: dict(schema.column_types) for table, schema in schemas.items()}
        self._ignored = {table: schema.ignored_columns for table, schema in schemas.items()}
        self._tokens: dict[TableRef, int] = {}
        self._recheck_s = recheck_s
        self._read_at = float("-inf")

    def with_schema_events(self, source: psycopg2.extensions.connection,
                           items: Sequence[ChangeEvent | Watermark],
                           tokens: SchemaTokens | None = None,
                           ) -> Sequence[ChangeEvent | Watermark]:
        """``tokens``: the schema tokens of the batch's streamed changes per table, in stream
        order without repeats; without them the catalog is read for every batch."""
        first: dict[TableRef, int] = {}  # each table's first streamed change in the batch
        for index, item in enumerate(items):
            if isinstance(item, ChangeEvent) and not item.from_snapshot:
                first.setdefault(item.table, index)
        if not first:
            return items
        if tokens is not None and time.monotonic() < self._read_at + self._recheck_s and all(
                list(tokens.get(table, ())) == [self._tokens.get(table)] for table in first):
            return items
        retyped = self._retyped(source)
        self._read_at = time.monotonic()
        if tokens is not None:
            for table, seen in tokens.items():
                self._tokens[table] = seen[-1]
        if not retyped:
            return items
        now_ms = int(time.time() * 1000)
        events = [ChangeEvent(table, "s", None, None, source_ts_ms=now_ms) for table in retyped]
        cut = min(first.values())
        return [*items[:cut], *events, *items[cut:]]

    def _retyped(self, source: psycopg2.extensions.connection) -> list[TableRef]:
        """The tables whose columns changed type since the last reading (added columns are
        watched from now on)."""
        tables = list(self._known)
        current = read_column_types(source, tables)
        retyped = []
        for table in tables:
            columns = {name: kind for name, kind in current.get(table, {}).items()
                       if name not in self._ignored[table]}
            known = self._known[table]
            if any(name in known and known[name] != kind for name, kind in columns.items()):
                retyped.append(table)
            self._known[table] = columns
        return retyped
