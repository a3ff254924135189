"""Reading a DuckDB table for the parity checks as the source is read: per-row checksums of
each row's text exactly as PostgreSQL prints the row (``ROW(...)::text``), in key order.

Values print back as PostgreSQL's text (``types``); the row text follows PostgreSQL's record
output (a field is quoted when empty or holding a quote, backslash, comma, parenthesis or
white space; quotes and backslashes doubled; NULL is an empty field), so equal rows hash
equally. Key order is DuckDB's: for integer, uuid and boolean keys (and text keys under the C
collation) it is PostgreSQL's; other keys are refused in one sentence rather than compared in
another order.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Sequence
from typing import Any

import duckdb
from psycopg2 import sql

from rosetta_dagster.core.destination import NotComparable
from rosetta_dagster.core.destination.duckdb.database import catalog, read_access
from rosetta_dagster.core.destination.duckdb.statements import quote, row_select
from rosetta_dagster.core.destination.duckdb.types import duck_type, ordered_like_postgres
from rosetta_dagster.core.destination.postgres.reader import EVERY_ROW
from rosetta_dagster.core.destination.postgres.statements import render
from rosetta_dagster.core.table_schema import TableSchema

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


class DuckDBTableReader:
    """Reads the database file one statement at a time, each through the hand-off
    (``database.read_access``): the stream goes on between them, so a count re-taken while
    rows are in flight sees them land."""

    def __init__(self, path: str) -> None:
        self.path = path

    @contextlib.contextmanager
    def _read(self) -> Iterator[tuple[duckdb.DuckDBPyConnection, str]]:
        """A connection and the file's catalog (tables are named with it)."""
        with read_access(self.path) as conn:
            yield conn, quote(catalog(conn))

    def count(self, relation: sql.Composable, condition: sql.Composable = EVERY_ROW,
              params: Sequence[Any] = ()) -> int:
        with self._read() as (conn, catalog_name):
            row = conn.execute(f"SELECT count(*) FROM {catalog_name}.{render(relation)} "
                               f"WHERE {render(condition).replace('%s', '?')}",
                               list(params)).fetchone()
        return int(row[0]) if row else 0

    def row_hashes(self, relation: sql.Composable, table: TableSchema,
                   after: tuple[Any, ...] | None, through: tuple[Any, ...] | None,
                   limit: int | None, condition: sql.Composable = EVERY_ROW,
                   ) -> list[tuple[tuple[Any, ...], str]]:
        unordered = [k for k in table.key_columns if not ordered_like_postgres(table.column(k))]
        if unordered or table.keyless:
            raise NotComparable(
                f"Content of {table.table.qualified} is not compared in DuckDB: its key "
                f"({', '.join(unordered) or 'none'}) does not sort there as in PostgreSQL "
                "(integer, uuid and boolean keys do).")
        params: list[Any] = []
        for bound in (after, through):
            if bound is not None:
                params.extend(None if v is None else str(v) for v in bound)
        renders = [duck_type(c).render for c in table.columns]
        width = len(table.key_columns)
        hashes = []
        with self._read() as (conn, catalog_name):
            statement = row_select(table, f"{catalog_name}.{render(relation)}",
                                   after=after is not None, through=through is not None,
                                   limit=limit)
            rows = conn.execute(statement, params).fetchall()
        for row in rows:
            text = row_text([None if v is None else render_value(v)
                             for render_value, v in zip(renders, row[width:], strict=True)])
            hashes.append((tuple(row[:width]),
                           hashlib.md5(text.encode(), usedforsecurity=False).hexdigest()))
        return hashes
