"""Whole tables written into Snowflake: the initial load's side (first start, re-sync, a table
added), and backfill chunks (``staging``). Each range is copied out of the source as CSV, each
column as two fields (whether it is NULL, then its PostgreSQL text: no CSV convention about
empty fields matters), uploaded to a temporary stage (PUT), loaded by ``COPY INTO`` into a
temporary table of text and cast into the table's types by one ``INSERT ... SELECT``. An empty
table is written directly; one that holds rows is loaded beside it and swapped in by one
transaction at :meth:`SnowflakeTableLoad.finish`."""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import Sequence
from typing import Any

import psycopg2.extensions
from psycopg2 import sql
from snowflake.connector.cursor import SnowflakeCursor

from rosetta_dagster.core.destination import ConnectionTracker
from rosetta_dagster.core.destination.snowflake.connection import cursor
from rosetta_dagster.core.destination.snowflake.statements import (
    copy_into,
    create_table,
    insert_loaded,
    join,
    literal,
    loaded_columns,
    quote,
)
from rosetta_dagster.core.destination.snowflake.writer import ensure_table
from rosetta_dagster.core.pipeline_config import Destination, PipelineDefinition
from rosetta_dagster.core.table_schema import TableSchema


def flagged_select(schema: TableSchema, select: sql.Composable) -> sql.Composed:
    """Each column of ``select`` as two: whether it is NULL, then ``v`` and the value's text
    (its output function), so that no value is an empty field or a word a CSV reader takes for
    NULL (Snowflake's default takes ``\\N``). The flag tests the value's text (a composite whose
    fields are all NULL ``IS NULL`` but is a value; ``format`` prints NULL as '')."""
    names = [sql.Identifier(f"c{i}") for i in range(len(schema.columns))]
    return sql.SQL("SELECT {} FROM ({}) AS s ({})").format(
        sql.SQL(", ").join(sql.SQL("{0}::text IS NULL, 'v' || format('%%s', {0})"
                                   ).format(name) for name in names),
        select, sql.SQL(", ").join(names))


def upload_rows(cur: SnowflakeCursor, source: psycopg2.extensions.connection,
                select: sql.Composable, params: Sequence[Any], schema: TableSchema,
                into: str, schema_name: str) -> int:
    """Copy the rows ``select`` reads from ``source`` into the table ``into`` (the table's
    types), through a temporary stage and table in ``schema_name``; the rows copied."""
    with tempfile.NamedTemporaryFile(prefix="rosetta-load-", suffix=".csv") as spool:
        with source.cursor() as source_cursor:
            copy_out = source_cursor.mogrify(
                sql.SQL("COPY ({}) TO STDOUT WITH (FORMAT csv)").format(
                    flagged_select(schema, select)), list(params)).decode()
            source_cursor.copy_expert(copy_out, spool)
        spool.flush()
        if spool.tell() == 0:
            return 0  # no rows (an empty file is not a CSV of any width)
        name = uuid.uuid4().hex
        loaded = quote(schema_name, f"_rosetta_loaded_{name}")
        stage = quote(schema_name, "_rosetta_load")
        cur.execute(f"CREATE TEMPORARY STAGE IF NOT EXISTS {stage}")
        cur.execute(f"CREATE TABLE {loaded} ({join(loaded_columns(schema))})")
        try:
            path = f"@{stage}/{name}"
            cur.execute(f"PUT {literal('file://' + spool.name)} {path} AUTO_COMPRESS = TRUE")
            cur.execute(copy_into(loaded, path))
            row = cur.execute(insert_loaded(schema, into, loaded)).fetchone()
        finally:
            cur.execute(f"DROP TABLE IF EXISTS {loaded}")
    return int(row[0]) if row else 0


class SnowflakeTableLoad:
    """One table loaded into one Snowflake destination (ranges may come from several threads,
    each on a connection of its own)."""

    def __init__(self, pipeline: PipelineDefinition, destination: Destination,
                 schema: TableSchema, *, widen: bool) -> None:
        self.destination = destination.name
        self._destination = destination
        self._schema = schema
        table = schema.target(destination.name, destination.schema)
        self._target = quote(table.schema, table.name)
        self._swap = quote(destination.schema, f"_rosetta_load_{table.name}")
        with cursor(destination) as cur:
            ensure_table(cur, schema, table, set())
            empty = cur.execute(f"SELECT count(*) FROM (SELECT 1 FROM {self._target} LIMIT 1)"
                                ).fetchone()
            self.mode = "direct" if empty is not None and empty[0] == 0 else "swap"
            if self.mode == "swap":
                cur.execute(f"DROP TABLE IF EXISTS {self._swap}")
                cur.execute(create_table(schema, self._swap))

    def copy(self, source: psycopg2.extensions.connection, select: sql.Composable,
             params: Sequence[Any], track: ConnectionTracker) -> int:
        into = self._target if self.mode == "direct" else self._swap
        with cursor(self._destination) as cur:
            return upload_rows(cur, source, select, params, self._schema, into,
                               self._destination.schema)

    def finish(self) -> None:
        if self.mode == "direct":
            return
        columns = ", ".join(quote(c.name) for c in self._schema.columns)
        with cursor(self._destination) as cur:
            cur.execute("BEGIN TRANSACTION")
            try:
                cur.execute(f"DELETE FROM {self._target}")
                cur.execute(f"INSERT INTO {self._target} ({columns}) "
                            f"SELECT {columns} FROM {self._swap}")
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            cur.execute(f"DROP TABLE IF EXISTS {self._swap}")
