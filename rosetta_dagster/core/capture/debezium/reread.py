"""Columns Debezium cannot carry exactly, re-read from the source by primary key.

Columns it never carries exactly (``values.always_reread``) are left out of its events
(``column.exclude.list``), so the connector never converts them, and every event of their
table is re-read. Dates and time stamps are carried in their ordinary range; an event with a
value outside it (BC, ±infinity) has its row re-read. One query per table per batch, values as
PostgreSQL's own text under the pinned settings.

Consistency: the value read may be newer than the event's (the row changed again since); the
destination then passes through that newer value earlier and converges when the later event is
applied. An event whose row is gone from the source is dropped: its delete follows.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg2.extensions
from psycopg2 import sql

from rosetta_dagster.core.apply.schema import TableSchema
from rosetta_dagster.core.capture.debezium.values import (
    SourceText,
    always_reread,
    converter_for,
    needs_reread,
    reread_when,
)
from rosetta_dagster.core.events import ChangeEvent, Watermark
from rosetta_dagster.core.pipeline_config import TableRef


@dataclass(frozen=True)
class _TableReread:
    schema: TableSchema
    columns: tuple[str, ...]  # every column that may be re-read
    excluded: tuple[str, ...]  # left out of Debezium's events: always re-read
    checks: tuple[tuple[str, Callable[[Any], bool]], ...]  # ordinary-range tests of the others

    def needed(self, event: ChangeEvent) -> bool:
        after = event.after or {}
        return bool(self.excluded) or any(
            (value := after.get(name)) is not None and not ordinary(value)
            for name, ordinary in self.checks)

    def query(self, keys: int) -> sql.Composed:
        """``WITH k(ord, key...) AS (VALUES ...) SELECT ord, column::text ... JOIN``."""
        key_columns = self.schema.primary_key
        row = sql.SQL("({})").format(sql.SQL(", ").join(
            [sql.SQL("%s::int")] + [sql.SQL("%s::{}").format(sql.SQL(self.schema.column(k).type_sql))
                                    for k in key_columns]))
        return sql.SQL(
            "WITH k (_rosetta_ord, {keys}) AS (VALUES {rows}) "
            "SELECT k._rosetta_ord, {values} FROM k JOIN {table} AS t ON {match}"
        ).format(
            keys=sql.SQL(", ").join(sql.Identifier(k) for k in key_columns),
            rows=sql.SQL(", ").join([row] * keys),
            values=sql.SQL(", ").join(sql.SQL("t.{}::text").format(sql.Identifier(c))
                                      for c in self.columns),
            table=sql.Identifier(self.schema.table.schema, self.schema.table.name),
            match=sql.SQL(" AND ").join(sql.SQL("t.{0} = k.{0}").format(sql.Identifier(k))
                                        for k in key_columns),
        )


def _plan(schema: TableSchema) -> _TableReread | None:
    columns = [c for c in schema.columns if c.name not in schema.primary_key and needs_reread(c)]
    if not columns:
        return None
    checks = tuple((c.name, check) for c in columns
                   if not always_reread(c) and (check := reread_when(c)) is not None)
    return _TableReread(schema, tuple(c.name for c in columns),
                        tuple(c.name for c in columns if always_reread(c)), checks)


class SourceReread:
    """Fills the left-out columns of a batch's events from the source."""

    def __init__(self, schemas: Mapping[TableRef, TableSchema]) -> None:
        self.schemas = schemas
        self.tables = {table: plan for table, schema in schemas.items()
                       if (plan := _plan(schema)) is not None}
        self._key_text = {table: [converter_for(plan.schema.column(k))
                                  for k in plan.schema.primary_key]
                          for table, plan in self.tables.items()}

    def exclude_list(self) -> str:
        """Debezium's ``column.exclude.list``: fully qualified column regexes of the columns
        re-read, and of those the tables' options leave out (never converted either)."""
        def escaped(name: str) -> str:
            return name.replace(".", "\\.").replace("$", "\\$")

        left_out = {t: [*(p.excluded if (p := self.tables.get(t)) else ()),
                        *sorted(s.ignored_columns)] for t, s in self.schemas.items()}
        return ",".join(f"{escaped(t.schema)}\\.{escaped(t.name)}\\.{escaped(c)}"
                        for t, columns in left_out.items() for c in columns)

    def fill(
        self, conn: psycopg2.extensions.connection, items: Sequence[ChangeEvent | Watermark]
    ) -> list[ChangeEvent | Watermark]:
        """The items with re-read values in place; events of rows gone are dropped."""
        wanted: dict[TableRef, dict[tuple[Any, ...], int]] = {}
        for item in items:
            if (isinstance(item, ChangeEvent) and item.table in self.tables and item.after
                    and self.tables[item.table].needed(item)):
                plan = self.tables[item.table]
                key = tuple(item.after.get(k) for k in plan.schema.primary_key)
                keys = wanted.setdefault(item.table, {})
                keys.setdefault(key, len(keys))
        if not wanted:
            return list(items)
        found: dict[TableRef, dict[int, tuple[Any, ...]]] = {}
        with conn.cursor() as cursor:
            for table, keys in wanted.items():
                plan, texts = self.tables[table], self._key_text[table]
                params: list[Any] = []
                for key, ordinal in keys.items():
                    params.append(ordinal)
                    params.extend(None if v is None else text(v) for v, text in zip(key, texts,
                                                                                  strict=True))
                cursor.execute(plan.query(len(keys)), params)
                found[table] = {row[0]: row[1:] for row in cursor.fetchall()}
        conn.rollback()  # read-only; do not keep a snapshot open
        kept: list[ChangeEvent | Watermark] = []
        for item in items:
            if isinstance(item, ChangeEvent) and item.table in wanted and item.after:
                plan = self.tables[item.table]
                ordinal = wanted[item.table].get(
                    tuple(item.after.get(k) for k in plan.schema.primary_key))
                if ordinal is not None:
                    values = found[item.table].get(ordinal)
                    if values is None:
                        continue  # the row is gone from the source: its delete follows
                    for name, value in zip(plan.columns, values, strict=True):
                        item.after[name] = None if value is None else SourceText(value)
            kept.append(item)
        return kept
