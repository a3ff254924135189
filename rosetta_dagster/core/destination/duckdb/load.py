"""Whole tables written into DuckDB: the initial load's side (first start, re-sync, a table
added). Each range is copied out of the source as CSV (every value its PostgreSQL text; NULL
unquoted, '' quoted), spooled to a temporary file and cast into the table's DuckDB types by
one ``INSERT ... SELECT ... FROM read_csv``. An empty table is written directly; one that
holds rows is loaded beside it and swapped in by one transaction at :meth:`finish`."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from typing import Any

import psycopg2.extensions
from psycopg2 import sql

from rosetta_dagster.core.destination import ConnectionTracker
from rosetta_dagster.core.destination.duckdb.database import catalog, connect
from rosetta_dagster.core.destination.duckdb.statements import create_table, csv_insert, quote
from rosetta_dagster.core.destination.duckdb.writer import ensure_table
from rosetta_dagster.core.pipeline_config import Destination, PipelineDefinition
from rosetta_dagster.core.table_schema import TableSchema


class DuckDBTableLoad:
    """One table loaded into one DuckDB destination (ranges may come from several threads)."""

    def __init__(self, pipeline: PipelineDefinition, destination: Destination,
                 schema: TableSchema, *, widen: bool) -> None:
        assert destination.path is not None
        self.destination = destination.name
        self._path = destination.path
        self._schema = schema
        table = schema.target(destination.name, destination.schema)
        conn = connect(self._path, what="the initial load")
        try:
            name = catalog(conn)
            self._target = quote(name, table.schema, table.name)
            self._swap = quote(name, destination.schema,
                               f"_rosetta_load_{abs(hash(schema.table.qualified)) % 10**12}")
            ensure_table(conn, schema, table, set())
            empty = conn.execute(f"SELECT NOT EXISTS (SELECT 1 FROM {self._target})"  # noqa: S608
                                 ).fetchone()
            self.mode = "direct" if empty and empty[0] else "swap"
            if self.mode == "swap":
                conn.execute(f"DROP TABLE IF EXISTS {self._swap}")
                conn.execute(create_table(schema, self._swap))
        finally:
            conn.close()

    def copy(self, source: psycopg2.extensions.connection, select: sql.Composable,
             params: Sequence[Any], track: ConnectionTracker) -> int:
        into = self._target if self.mode == "direct" else self._swap
        with tempfile.NamedTemporaryFile(prefix="rosetta-load-", suffix=".csv") as spool:
            with source.cursor() as cursor:
                copy_out = cursor.mogrify(sql.SQL("COPY ({}) TO STDOUT WITH (FORMAT csv)").format(
                    select), list(params)).decode()
                cursor.copy_expert(copy_out, spool)
            spool.flush()
            conn = connect(self._path, what="the initial load")
            try:
                row = conn.execute(csv_insert(self._schema, into), [spool.name]).fetchone()
            finally:
                conn.close()
        return int(row[0]) if row else 0

    def finish(self) -> None:
        if self.mode == "direct":
            return
        columns = ", ".join(quote(c.name) for c in self._schema.columns)
        conn = connect(self._path, what="the initial load")
        try:
            conn.execute("BEGIN TRANSACTION")
            conn.execute(f"DELETE FROM {self._target}")  # noqa: S608
            conn.execute(f"INSERT INTO {self._target} ({columns}) "  # noqa: S608
                         f"SELECT {columns} FROM {self._swap}")
            conn.execute(f"DROP TABLE {self._swap}")
            conn.execute("COMMIT")
        finally:
            conn.close()
