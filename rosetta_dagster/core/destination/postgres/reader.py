"""Reading a PostgreSQL table's rows for the parity checks: counts and per-row checksums in key
order (a table without a key: in checksum order). The source is read the same way (it is
PostgreSQL too), so both sides hash the same text: each row's replicated columns as PostgreSQL
prints them (``exact_select``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg2.extensions
from psycopg2 import sql

from rosetta_dagster.core.table_schema import TableSchema, exact_select

EVERY_ROW = sql.SQL("TRUE")


class PostgresTableReader:
    """Reads on one connection (the caller's: it opens and closes it)."""

    def __init__(self, conn: psycopg2.extensions.connection) -> None:
        self.conn = conn

    def count(self, relation: sql.Composable, condition: sql.Composable = EVERY_ROW,
              params: Sequence[Any] = ()) -> int:
        with self.conn.cursor() as cursor:  # params even when empty: see replicated_rows
            cursor.execute(sql.SQL("SELECT count(*) FROM {} WHERE {}").format(
                relation, condition), list(params))
            return int(cursor.fetchone()[0])  # type: ignore[index]

    def row_hashes(self, relation: sql.Composable, table: TableSchema,
                   after: tuple[Any, ...] | None, through: tuple[Any, ...] | None,
                   limit: int | None, condition: sql.Composable = EVERY_ROW,
                   ) -> list[tuple[tuple[Any, ...], str]]:
        row_hash = sql.SQL("md5(ROW({})::text)").format(
            sql.SQL(", ").join(exact_select(c) for c in table.columns))
        # A table without a key is a multiset: its rows are ordered (and chunked) by their
        # checksum, equal rows side by side.
        keys = (row_hash if table.keyless
                else sql.SQL(", ").join(sql.Identifier(k) for k in table.key_columns))
        key_row = sql.SQL("ROW({})").format(keys)
        conditions: list[sql.Composable] = [condition]
        params: list[Any] = []
        for operator, bound in ((">", after), ("<=", through)):
            if bound is not None:
                conditions.append(sql.SQL("{} " + operator + " ROW({})").format(
                    key_row, sql.SQL(", ").join(sql.Placeholder() * len(bound))))
                params.extend(bound)
        query = sql.SQL(
            "SELECT {keys}, {row_hash} FROM {table} WHERE {where} ORDER BY {keys}"
        ).format(keys=keys, row_hash=row_hash, table=relation,
                 where=sql.SQL(" AND ").join(conditions))
        if limit is not None:
            # Without a key, equal rows at the limit all come: a chunk never splits them.
            query = query + sql.SQL(" FETCH FIRST {} ROWS WITH TIES" if table.keyless
                                    else " LIMIT {}").format(sql.Literal(limit))
        width = len(table.key_columns) or 1
        with self.conn.cursor() as cursor:
            cursor.execute(query, params)
            return [(tuple(row[:width]), row[width]) for row in cursor.fetchall()]
