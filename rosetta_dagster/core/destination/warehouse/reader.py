"""Reading a warehouse table for the parity checks as the source is read: per-row checksums of
each row's text exactly as PostgreSQL prints the row (``ROW(...)::text``), in key order.

Values print back as PostgreSQL's text (each kind's ``types``); the row text follows
PostgreSQL's record output (a field is quoted when empty or holding a quote, backslash, comma,
parenthesis or white space; quotes and backslashes doubled; NULL is an empty field), so equal
rows hash equally. Key order is the warehouse's: for integer, uuid and boolean keys it is
PostgreSQL's; other keys are refused in one sentence rather than compared in another order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any, ClassVar

from psycopg2 import sql

from rosetta_dagster.core.destination import NotComparable
from rosetta_dagster.core.destination.postgres.reader import EVERY_ROW
from rosetta_dagster.core.destination.postgres.statements import render
from rosetta_dagster.core.destination.warehouse.statements import (
    TEXT_PARAMETER,
    quote,
    row_select,
)
from rosetta_dagster.core.destination.warehouse.types import KeptType
from rosetta_dagster.core.table_schema import Column, TableSchema

_QUOTE_WHEN = frozenset('"\\(),') | frozenset(" \t\n\r\v\f")


def record_field(text: str | None) -> str:
    """One field of PostgreSQL's record text."""
    if text is None:
        return ""
    if text == "" or any(ch in _QUOTE_WHEN for ch in text):
        return '"' + text.replace("\\", "\\\\").replace('"', '""') + '"'
    return text


def row_text(fields: Sequence[str | None]) -> str:
    return "(" + ",".join(record_field(f) for f in fields) + ")"


def _row_hash(renders: Sequence[Callable[[Any], str]], values: Sequence[Any]) -> str:
    """md5 of the row's PostgreSQL record text (as ``md5(ROW(...)::text)`` on the source)."""
    text = row_text([None if v is None else render(v)
                     for render, v in zip(renders, values, strict=True)])
    return hashlib.md5(text.encode(), usedforsecurity=False).hexdigest()


class WarehouseTableReader:
    """Reads one warehouse's tables (each kind says how it reaches the database)."""

    kind: ClassVar[str]
    text_parameter: ClassVar[str] = TEXT_PARAMETER

    def kept(self, column: Column) -> KeptType:
        raise NotImplementedError

    def ordered_like_postgres(self, column: Column) -> bool:
        raise NotImplementedError

    def _read(self) -> AbstractContextManager[tuple[Any, str]]:
        """A cursor and the prefix of table names (DuckDB's catalog, '' elsewhere)."""
        raise NotImplementedError

    def count(self, relation: sql.Composable, condition: sql.Composable = EVERY_ROW,
              params: Sequence[Any] = ()) -> int:
        with self._read() as (conn, catalog_name):
            row = conn.execute(f"SELECT count(*) FROM {catalog_name}{render(relation)} "
                               f"WHERE {render(condition).replace('%s', '?')}",
                               list(params)).fetchone()
        return int(row[0]) if row else 0

    def row_hashes(self, relation: sql.Composable, table: TableSchema,
                   after: tuple[Any, ...] | None, through: tuple[Any, ...] | None,
                   limit: int | None, condition: sql.Composable = EVERY_ROW,
                   ) -> list[tuple[tuple[Any, ...], str]]:
        if table.keyless:
            return self._multiset_hashes(relation, table, after, through, limit)
        unordered = [k for k in table.key_columns
                     if not self.ordered_like_postgres(table.column(k))]
        if unordered:
            raise NotComparable(
                f"Content of {table.table.qualified} is not compared in {self.kind}: its key "
                f"({', '.join(unordered)}) does not sort there as in PostgreSQL "
                "(integer, uuid and boolean keys do).")
        params: list[Any] = []
        for bound in (after, through):
            if bound is not None:
                params.extend(None if v is None else str(v) for v in bound)
        renders = [self.kept(c).render for c in table.columns]
        width = len(table.key_columns)
        hashes = []
        with self._read() as (conn, catalog_name):
            statement = row_select(self.kept, table, f"{catalog_name}{render(relation)}",
                                   after=after is not None, through=through is not None,
                                   limit=limit, text_parameter=self.text_parameter)
            rows = conn.execute(statement, params).fetchall()
        for row in rows:
            hashes.append((tuple(row[:width]), _row_hash(renders, row[width:])))
        return hashes

    def _multiset_hashes(self, relation: sql.Composable, table: TableSchema,
                         after: tuple[Any, ...] | None, through: tuple[Any, ...] | None,
                         limit: int | None) -> list[tuple[tuple[Any, ...], str]]:
        """A table without a key, as the source reads it: rows ordered (and bounded) by their
        checksum, equal rows side by side and never split by the limit. The whole table is
        read and ordered here (hex digits order alike in every collation)."""
        renders = [self.kept(c).render for c in table.columns]
        columns = ", ".join(quote(c.name) for c in table.columns)
        with self._read() as (conn, catalog_name):
            rows = conn.execute(f"SELECT {columns} FROM {catalog_name}{render(relation)}"
                                ).fetchall()
        hashes = sorted(_row_hash(renders, row) for row in rows)
        chosen = [h for h in hashes if (after is None or h > after[0])
                  and (through is None or h <= through[0])]
        if limit is not None and len(chosen) > limit:
            end = limit  # with ties: the copies of the last row come too
            while end < len(chosen) and chosen[end] == chosen[limit - 1]:
                end += 1
            chosen = chosen[:end]
        return [((h,), h) for h in chosen]
