"""Whole tables written with COPY: the initial load's side of a PostgreSQL destination.

Used by the initial load (first start, re-sync after a lost slot, a table added to a
pipeline). An empty destination table is written directly, range by range. One that already
holds rows is loaded into an unlogged table beside it and swapped in within one transaction
(``TRUNCATE`` + ``INSERT ... SELECT`` + ``DROP``): readers never see it half loaded, and rows
that no longer exist in the source disappear.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg2.extensions
from psycopg2 import sql

from rosetta_dagster.core.destination import ConnectionTracker
from rosetta_dagster.core.destination.postgres.ddl import ensure_destination_table
from rosetta_dagster.core.pipeline_config import Destination, PipelineDefinition
from rosetta_dagster.core.replication import connect_destination, destination_connection
from rosetta_dagster.core.table_schema import TableSchema, xml_as_text

# PostgreSQL's FirstNormalObjectId: OIDs below it are the server's own (built-in) objects.
FIRST_NORMAL_OID = 16384
_PIPE_BUFFER = 1 << 20


def binary_copy(schema: TableSchema) -> bool:
    """Binary COPY when every column has a built-in type: the binary form of arrays and
    composites carries type OIDs, which differ on the destination for any other type. Not for
    xml, selected as its text (see ``exact_select``): the binary input of xml would decode it
    in the encoding its declaration names, not the one it was sent in."""
    return all(0 < column.type_oid < FIRST_NORMAL_OID and not xml_as_text(column)
               for column in schema.columns)


def _swap_table_name(schema: TableSchema) -> str:
    # Postgres truncates identifiers at 63 bytes; keep the name unique per source table.
    name = f"_rosetta_load_{schema.table.name}"
    if len(name.encode()) > 63:
        name = f"_rosetta_load_{abs(hash(schema.table.qualified)) % 10**12}"
    return name


@dataclass(frozen=True)
class BulkTableLoad:
    """Where one table's rows go in one destination, and how they are made visible."""

    target_schema: str  # the destination's schema (the swap table is made there)
    schema: TableSchema
    mode: str  # "direct" (the table was empty) or "swap"
    destination: str

    @classmethod
    def begin(
        cls, conn: psycopg2.extensions.connection, target_schema: str, schema: TableSchema,
        destination: str,
    ) -> BulkTableLoad:
        """Choose the mode from the destination table's content; prepare the swap table."""
        table = schema.target_sql(destination, target_schema)
        with conn.cursor() as cursor:
            cursor.execute(sql.SQL("SELECT NOT EXISTS (SELECT 1 FROM {})").format(table))
            row = cursor.fetchone()
        load = cls(target_schema, schema, "direct" if row and row[0] else "swap", destination)
        if load.mode == "swap":
            with conn.cursor() as cursor:
                cursor.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(load.copy_target))
                cursor.execute(
                    sql.SQL("CREATE UNLOGGED TABLE {} (LIKE {} INCLUDING DEFAULTS)").format(
                        load.copy_target, table
                    )
                )
        return load

    @property
    def target(self) -> sql.Identifier:
        return self.schema.target_sql(self.destination, self.target_schema)

    @property
    def copy_target(self) -> sql.Identifier:
        if self.mode == "direct":
            return self.target
        return sql.Identifier(self.target_schema, _swap_table_name(self.schema))

    @property
    def binary(self) -> bool:
        return binary_copy(self.schema)

    def copy_from_stdin(self) -> sql.Composed:
        columns = sql.SQL(", ").join(sql.Identifier(c) for c in self.schema.column_names)
        options = sql.SQL(" (FORMAT binary)" if self.binary else "")
        return sql.SQL("COPY {} ({}) FROM STDIN{}").format(self.copy_target, columns, options)

    def finish(self, conn: psycopg2.extensions.connection) -> None:
        """Make the loaded rows the table's rows (swap mode; direct loads are already there).
        ``conn`` must not be in autocommit: the swap is one transaction."""
        if self.mode == "direct":
            return
        target = self.target
        columns = sql.SQL(", ").join(sql.Identifier(c) for c in self.schema.column_names)
        with conn.cursor() as cursor:
            cursor.execute(sql.SQL("TRUNCATE {}").format(target))
            cursor.execute(
                sql.SQL("INSERT INTO {} ({}) SELECT {} FROM {}").format(
                    target, columns, columns, self.copy_target
                )
            )
            cursor.execute(sql.SQL("DROP TABLE {}").format(self.copy_target))
        conn.commit()


def pipe_copy(
    source: psycopg2.extensions.connection,
    copy_out: str,
    target: psycopg2.extensions.connection,
    copy_in: str,
) -> int:
    """Stream COPY TO STDOUT of ``source`` into COPY FROM STDIN of ``target`` through a pipe.

    The reading side runs in a helper thread. A source failure is re-raised before the caller
    commits: the target sees an early end of data and would otherwise keep a partial range.
    """
    read_fd, write_fd = os.pipe()
    # Both ends are file objects before the helper starts: whatever happens, closing the sink
    # ends the feed (EOF) and closing the feed ends the sink (EPIPE), so neither side hangs.
    feed = os.fdopen(read_fd, "rb", buffering=_PIPE_BUFFER)
    sink = os.fdopen(write_fd, "wb", buffering=_PIPE_BUFFER)
    failure: list[BaseException] = []

    def produce() -> None:
        try:
            with sink, source.cursor() as cursor:
                cursor.copy_expert(copy_out, sink)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consuming thread
            failure.append(exc)

    producer = threading.Thread(target=produce, name="copy-out", daemon=True)
    producer.start()
    try:
        with feed, target.cursor() as cursor:
            cursor.copy_expert(copy_in, feed, size=_PIPE_BUFFER)
            rows = cursor.rowcount
    finally:
        producer.join()
    if failure:
        raise failure[0]
    return int(rows)


class PostgresTableLoad:
    """One table loaded into one PostgreSQL destination, range by range on connections of
    its own, made visible by :meth:`finish`."""

    def __init__(self, pipeline: PipelineDefinition, destination: Destination,
                 schema: TableSchema, *, widen: bool) -> None:
        self._pipeline = pipeline
        self._destination = destination
        self.destination = destination.name
        with destination_connection(pipeline, destination) as conn:
            if widen:
                conn.autocommit = False  # one transaction (a retyped column: under a savepoint)
                with conn:
                    ensure_destination_table(conn, schema, destination.schema, destination.name)
                conn.autocommit = True
            self._bulk = BulkTableLoad.begin(conn, destination.schema, schema, destination.name)
        self.mode = self._bulk.mode

    def copy(self, source: psycopg2.extensions.connection, select: sql.Composable,
             params: Sequence[Any], track: ConnectionTracker) -> int:
        options = sql.SQL(" (FORMAT binary)" if self._bulk.binary else "")
        with source.cursor() as cursor:
            copy_out = cursor.mogrify(sql.SQL("COPY ({}) TO STDOUT{}").format(select, options),
                                      list(params)).decode()
        target = connect_destination(self._pipeline, self._destination)
        try:
            target.autocommit = False
            with track(target):
                rows = pipe_copy(source, copy_out, target,
                                 self._bulk.copy_from_stdin().as_string(target))
            target.commit()
            return rows
        finally:
            target.close()

    def finish(self) -> None:
        if self.mode == "direct":
            return
        conn = connect_destination(self._pipeline, self._destination)
        try:
            conn.autocommit = False
            self._bulk.finish(conn)
        finally:
            conn.close()
