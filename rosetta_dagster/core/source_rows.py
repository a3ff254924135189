"""Rows read back from the source by primary key, as PostgreSQL's own text.

Used where a change event cannot say a value exactly: columns an engine cannot carry, an
``xml`` value (logical decoding prints it without a default XML declaration), a value a change
left out (unchanged TOAST) whose row the destination does not hold. The value read may be
newer than the event's (the row changed again since): the destination then passes through
that newer value early and converges when the later change is applied.

``column::text`` is the type's text under the pinned settings of the connection; for ``xml``
it is the stored text itself (the cast keeps the declaration the output function drops).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import psycopg2.extensions
from psycopg2 import sql

from rosetta_dagster.core.table_schema import TableSchema

KeyText = tuple[str | None, ...]


def read_by_key_query(schema: TableSchema, columns: Sequence[str], keys: int) -> sql.Composed:
    """``WITH k (_rosetta_ord, key...) AS (VALUES ...) SELECT ord, column::text ... JOIN``:
    parameters per key are its ordinal, then its columns' text."""
    key_columns = schema.key_columns
    row = sql.SQL("({})").format(sql.SQL(", ").join(
        [sql.SQL("%s::int")] + [sql.SQL("%s::{}").format(sql.SQL(schema.column(k).type_sql))
                                for k in key_columns]))
    return sql.SQL(
        "WITH k (_rosetta_ord, {keys}) AS (VALUES {rows}) "
        "SELECT k._rosetta_ord, {values} FROM k JOIN {table} AS t ON {match}"
    ).format(
        keys=sql.SQL(", ").join(sql.Identifier(k) for k in key_columns),
        rows=sql.SQL(", ").join([row] * keys),
        values=sql.SQL(", ").join(sql.SQL("t.{}::text").format(sql.Identifier(c))
                                  for c in columns),
        table=schema.source_sql,
        match=sql.SQL(" AND ").join(sql.SQL("t.{0} = k.{0}").format(sql.Identifier(k))
                                    for k in key_columns),
    )


class SourceRows:
    """Reads rows of the source by key on one connection of its own (opened on first use,
    used by one thread: the one that applies batches)."""

    def __init__(self, connect: Callable[[], psycopg2.extensions.connection]) -> None:
        self._connect = connect
        self._conn: psycopg2.extensions.connection | None = None

    def connection(self) -> psycopg2.extensions.connection:
        if self._conn is None or self._conn.closed:
            self._conn = self._connect()
        return self._conn

    def read(self, schema: TableSchema, columns: Sequence[str], keys: Sequence[KeyText]
             ) -> dict[KeyText, tuple[str | None, ...]]:
        """``columns`` of each row found, by its key; rows gone from the source are absent."""
        if not keys:
            return {}
        params: list[object] = []
        for ordinal, key in enumerate(keys):
            params.append(ordinal)
            params.extend(key)
        conn = self.connection()
        with conn.cursor() as cursor:
            cursor.execute(read_by_key_query(schema, columns, len(keys)), params)
            found = {keys[row[0]]: tuple(row[1:]) for row in cursor.fetchall()}
        if not conn.autocommit:
            conn.rollback()  # read-only; do not keep a snapshot open
        return found

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
