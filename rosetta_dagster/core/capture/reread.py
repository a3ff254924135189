"""Columns an engine cannot carry exactly, re-read from the source by primary key.

Each engine's :class:`ValueCodec` says which columns it never carries exactly
(``always_reread``: every event of their table is re-read) and which it carries in an ordinary
range only (``reread_when``: a value outside it has its row re-read). Debezium leaves the
former out of its events (``column.exclude.list``), so it never converts them; pgoutput sends
them and the source's text replaces them (``xml``: logical decoding prints a value without its
default XML declaration). One query per table per batch, values as PostgreSQL's own text under
the pinned settings (see ``core.source_rows``).

Consistency: the value read may be newer than the event's (the row changed again since); the
destination then passes through that newer value earlier and converges when the later event is
applied. When the row is gone from the source (deleted, or moved to another key), the event
keeps its own values and leaves the re-read columns out (as unchanged: the destination row
keeps what it has): the change that removed the row follows, and if it moved the row, it
takes the TOASTed values it leaves out from this one (as the old row was just before it) and
re-reads its own. (Turning such an event into a delete of its key lost the values it carried:
the moved row then took older ones.)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rosetta_dagster.core.errors import RosettaError
from rosetta_dagster.core.events import UNCHANGED_TOAST, ChangeEvent, Watermark, format_lsn
from rosetta_dagster.core.pipeline_config import TableRef
from rosetta_dagster.core.source_rows import KeyText, SourceRows
from rosetta_dagster.core.table_schema import TableSchema
from rosetta_dagster.core.values import Converter, SourceText, ValueCodec


@dataclass(frozen=True)
class _TableReread:
    schema: TableSchema
    columns: tuple[str, ...]  # every column that may be re-read
    always: tuple[str, ...]  # re-read in every event of the table
    checks: tuple[tuple[str, Callable[[Any], bool]], ...]  # ordinary-range tests of the others
    key_text: tuple[Converter, ...]  # the engine's key values -> PostgreSQL text
    in_snapshot: tuple[str, ...] = ()  # re-read in every event of the engine's snapshot

    def needed(self, event: ChangeEvent) -> bool:
        after = event.after or {}
        return bool(self.always) or any(
            (value := after.get(name)) is not None and not ordinary(value)
            for name, ordinary in self.checks) or (
            bool(self.in_snapshot) and event.from_snapshot
            and any(after.get(name) is not None for name in self.in_snapshot))

    def leave_out(self, after: dict[str, Any]) -> None:
        """The row is gone from the source: the values that needed re-reading are left out."""
        for name in self.always:
            after[name] = UNCHANGED_TOAST
        for name, ordinary in self.checks:
            if (value := after.get(name)) is not None and not ordinary(value):
                after[name] = UNCHANGED_TOAST

    def key(self, event: ChangeEvent) -> KeyText:
        after = event.after or {}
        return tuple(None if (v := after.get(k)) is None else text(v)
                     for k, text in zip(self.schema.key_columns, self.key_text, strict=True))


class UnreadableValue(RosettaError):  # noqa: N818 - a value the stream cannot take
    """A table without a key received a value the engine does not carry exactly: it has no
    key to read the value back from the source by."""


def _range_checks(schema: TableSchema, codec: ValueCodec
                  ) -> tuple[tuple[str, Callable[[Any], bool]], ...]:
    return tuple((c.name, check) for c in schema.columns
                 if not codec.always_reread(c) and (check := codec.reread_when(c)) is not None)


def _refuse_unreadable(event: ChangeEvent, checks: Sequence[tuple[str, Callable[[Any], bool]]],
                       schema: TableSchema) -> None:
    """A change of a table without a key with a value out of the engine's exact range (in its
    new or its old row) stops the stream, naming the change: taken as it is, the value would
    be another one."""
    for values in (event.after, event.before):
        for name, ordinary in checks:
            if values and (value := values.get(name)) is not None and not ordinary(value):
                where = f" at LSN {format_lsn(event.lsn)}" if event.lsn is not None else ""
                raise UnreadableValue(
                    f"A change of {schema.table.qualified}{where} has a value in column {name} "
                    f"({schema.column(name).type_sql}) outside the range the Debezium engine "
                    "carries exactly (a year before 1 or after 9999, or ±infinity), and the "
                    "table has no key to read it back from the source by; give the table a "
                    "key (a primary key or REPLICA IDENTITY USING INDEX) or use "
                    "streaming.engine: pgoutput.")


def _plan(schema: TableSchema, codec: ValueCodec) -> _TableReread | None:
    columns = [c for c in schema.columns
               if c.name not in schema.key_columns and codec.reread(c)]
    if not columns:
        return None
    checks = tuple(check for check in _range_checks(schema, codec)
                   if check[0] not in schema.key_columns)
    return _TableReread(schema, tuple(c.name for c in columns),
                        tuple(c.name for c in columns if codec.always_reread(c)), checks,
                        tuple(codec.converter_for(schema.column(k)) for k in schema.key_columns),
                        tuple(c.name for c in columns if codec.reread_in_snapshot(c)))


class SourceReread:
    """Fills the columns an engine cannot carry into a batch's events, from the source.

    A column added on the source after the stream read its tables (``ALTER TABLE … ADD
    COLUMN``, maybe of a type to re-read, with a value out of the engine's range, e.g. a BC
    date) arrives in events first: the table's schema is then read again (``read_schema``)
    before the batch is filled, so its values are re-read like those of any other column."""

    def __init__(self, schemas: Mapping[TableRef, TableSchema], codec: ValueCodec,
                 read_schema: Callable[[TableRef], TableSchema] | None = None) -> None:
        self.schemas = dict(schemas)
        self.codec = codec
        self.read_schema = read_schema
        self.tables: dict[TableRef, _TableReread] = {}
        # Tables without a key: the range checks of their columns (nothing to re-read by).
        self.unreadable: dict[TableRef, tuple[tuple[str, Callable[[Any], bool]], ...]] = {}
        self._known: dict[TableRef, frozenset[str]] = {}
        for table, schema in schemas.items():
            self._follow(table, schema)

    def _follow(self, table: TableRef, schema: TableSchema) -> None:
        """Plan ``table``'s re-reads from ``schema``. A table without a key has nothing to
        re-read by: its engine carries every column exactly, or the stream refused the table
        (core.streaming.prestream)."""
        self.schemas[table] = schema
        self._known[table] = frozenset(schema.column_names) | schema.ignored_columns
        plan = None if schema.keyless else _plan(schema, self.codec)
        checks = _range_checks(schema, self.codec) if schema.keyless else ()
        if checks:
            self.unreadable[table] = checks
        else:
            self.unreadable.pop(table, None)
        if plan is None:
            self.tables.pop(table, None)
        else:
            self.tables[table] = plan

    def _follow_added_columns(self, items: Sequence[ChangeEvent | Watermark]) -> None:
        """Tables an event shows a column of that their schema lacks: read again."""
        if self.read_schema is None:
            return
        stale: set[TableRef] = set()
        known = self._known
        for item in items:
            if (isinstance(item, ChangeEvent) and item.after and item.table in known
                    and not known[item.table].issuperset(item.after)):
                stale.add(item.table)
        for table in stale:
            self._follow(table, self.read_schema(table))

    def always(self, table: TableRef) -> tuple[str, ...]:
        """The table's columns re-read in every event."""
        plan = self.tables.get(table)
        return plan.always if plan is not None else ()

    def fill(
        self, source: SourceRows, items: Sequence[ChangeEvent | Watermark]
    ) -> list[ChangeEvent | Watermark]:
        """The items with re-read values in place (left out where the row is gone)."""
        self._follow_added_columns(items)
        wanted: dict[TableRef, dict[KeyText, None]] = {}
        unreadable = self.unreadable
        for item in items:
            if unreadable and isinstance(item, ChangeEvent) and item.table in unreadable:
                _refuse_unreadable(item, unreadable[item.table], self.schemas[item.table])
            if (isinstance(item, ChangeEvent) and item.table in self.tables and item.after
                    and self.tables[item.table].needed(item)):
                wanted.setdefault(item.table, {})[self.tables[item.table].key(item)] = None
        if not wanted:
            return list(items)
        found = {table: source.read(self.tables[table].schema, self.tables[table].columns,
                                    list(keys))
                 for table, keys in wanted.items()}
        kept: list[ChangeEvent | Watermark] = []
        for item in items:
            if isinstance(item, ChangeEvent) and item.table in wanted and item.after:
                plan = self.tables[item.table]
                key = plan.key(item)
                if key in wanted[item.table]:
                    values = found[item.table].get(key)
                    if values is None:  # gone from the source: the change that did it follows
                        plan.leave_out(item.after)
                        kept.append(item)
                        continue
                    for name, value in zip(plan.columns, values, strict=True):
                        item.after[name] = None if value is None else SourceText(value)
            kept.append(item)
        return kept
