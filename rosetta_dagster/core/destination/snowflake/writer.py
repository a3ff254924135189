"""A stream's writer to a Snowflake destination (``warehouse.writer`` says what every warehouse
writer does): the batch's text rows bound into a raw stage table, cast into the stage, merged by
a DELETE and an INSERT per table (``statements``), the position in the same transaction. Every
table a batch needs is made before its transaction begins (Snowflake commits at DDL).

A table without a key (pgoutput only) is applied by net count per row (``keyless_changes``;
statements: ``statements.keyless_statements``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import pandas
import snowflake.connector
from snowflake.connector.cursor import SnowflakeCursor

from rosetta_dagster.core.destination import BatchResult, KeyBounds, RetypedColumn
from rosetta_dagster.core.destination.keyless_changes import KeylessChanges
from rosetta_dagster.core.destination.snowflake.statements import (
    IN_SCHEMA,
    NUMBERS_TABLE,
    TEXT_PARAMETER,
    ChunkMergeStatements,
    KeylessStatements,
    add_column,
    batch_statements,
    bound_parameters,
    chunk_merge_statements,
    chunks_statements,
    columns_statements,
    create_table,
    drop_column,
    fill_added_column,
    in_schema,
    insert_rows,
    keyless_statements,
    positions_statements,
    quote,
    resync_statements,
    schema_columns,
    stage_tables,
    table_columns,
)
from rosetta_dagster.core.destination.snowflake.types import snow_type
from rosetta_dagster.core.destination.warehouse.types import KeptType
from rosetta_dagster.core.destination.warehouse.writer import (
    TablePlan,
    WarehouseWriter,
    keyless_frame,
)
from rosetta_dagster.core.pipeline_config import TableRef
from rosetta_dagster.core.table_schema import Column, TableSchema

# Rows bound per INSERT (inline bindings: a request stays a few MB for ordinary rows).
ROWS_PER_INSERT = 1000


def chunk_table(target: TableRef, job_id: int, chunk: int) -> str:
    """A backfill chunk staged by the job, beside the target (renamed to this when whole)."""
    return quote(target.schema, f"_rosetta_chunk_{int(job_id)}_{int(chunk)}")


def put_rows(cursor: SnowflakeCursor, table: str, rows: list[tuple[Any, ...]]) -> None:
    """Bind ``rows`` into ``table``, a slice at a time."""
    if not rows:
        return
    statement = insert_rows(table, len(rows[0]))
    for start in range(0, len(rows), ROWS_PER_INSERT):
        cursor.executemany(statement, rows[start:start + ROWS_PER_INSERT])


def _plain(value: Any) -> Any:
    """A value the connector binds: text as ``str`` (the engines' text may be a subclass)."""
    return str(value) if isinstance(value, str) and type(value) is not str else value


def frame_rows(frame: pandas.DataFrame) -> list[tuple[Any, ...]]:
    """A DataFrame's rows as plain Python values (the connector binds neither numpy scalars
    nor subclasses of ``str``)."""
    columns = [[_plain(value) for value in frame[column].tolist()] for column in frame.columns]
    return list(zip(*columns, strict=True))


@dataclass(frozen=True)
class SchemaCatalog:
    """What :func:`ensure_table` reads of a destination schema, read once for all the tables a
    stream prepares (against Snowflake a statement is a round trip of ~0.1 s, and a pipeline
    may have a hundred tables)."""

    columns: dict[str, dict[str, str]]  # table: its columns' types, as the catalog says
    recorded: dict[str, dict[str, str]]  # table: its columns' recorded source types


def read_schema_catalog(cursor: SnowflakeCursor, schema_name: str) -> SchemaCatalog:
    """Make the schema and its column records if need be, and read both for every table."""
    record = columns_statements(schema_name)
    cursor.execute(f"CREATE SCHEMA IF NOT EXISTS {quote(schema_name)}")
    cursor.execute(record.create)
    columns: dict[str, dict[str, str]] = {}
    recorded: dict[str, dict[str, str]] = {}
    statement, params = schema_columns(schema_name)
    for table, column, data_type in cursor.execute(statement, params).fetchall():
        columns.setdefault(table, {})[column] = data_type
    for table, column, source_type in cursor.execute(record.read_all).fetchall():
        recorded.setdefault(table, {})[column] = source_type
    return SchemaCatalog(columns, recorded)


def ensure_table(cursor: SnowflakeCursor, schema: TableSchema, table: TableRef,
                 created: set[TableRef],
                 retyped: dict[TableRef, tuple[RetypedColumn, ...]] | None = None,
                 catalog: SchemaCatalog | None = None) -> None:
    """Create the destination table like the source, add new columns (rows that existed take
    the source's missing value), and follow a column whose type changed on the source: the
    column is made again in its new type (empty until the caller copies the rows again) and
    reported in ``retyped``. The source type of each column is recorded last, so a crash
    between steps is finished by the next call. ``catalog``: the schema as read just before
    (by :func:`read_schema_catalog`, which made it and its records); else the table's part is
    read here."""
    target = quote(table.schema, table.name)
    record = columns_statements(table.schema)
    statement, params = table_columns(table.schema)
    if catalog is None:
        cursor.execute(f"CREATE SCHEMA IF NOT EXISTS {quote(table.schema)}")
        cursor.execute(record.create)
        existing = dict(cursor.execute(statement, [*params, table.name]).fetchall())
    else:
        existing = catalog.columns.get(table.name, {})
    made_now = not existing
    if made_now:
        cursor.execute(create_table(schema, target))
        created.add(schema.table)
        # Another connection (the initial load's) may have made it meanwhile.
        existing = dict(cursor.execute(statement, [*params, table.name]).fetchall())
    recorded = (catalog.recorded.get(table.name, {}) if catalog is not None and not made_now
                else dict(cursor.execute(record.read, [table.name]).fetchall()))
    recording: list[Column] = []
    for column in schema.columns:
        was = recorded.get(column.name)
        if was == column.type_sql:
            continue
        # Rows that existed read the source's missing value: a column added now, or added
        # before a crash and not yet recorded (no batch has written it since).
        fill = column.missing_value is not None and was is None and not made_now
        if column.name in existing and was is not None:  # retyped on the source
            # Text stays text (its values stay until the rows are copied again); another
            # type is made again, empty until then.
            if not (existing[column.name] == "TEXT" and snow_type(column).sql == "VARCHAR"):
                cursor.execute(drop_column(target, column.name))
                cursor.execute(add_column(target, column))
            if retyped is not None:
                retyped[schema.table] = (*retyped.get(schema.table, ()),
                                         RetypedColumn(column.name, was, column.type_sql))
        elif column.name not in existing:
            cursor.execute(add_column(target, column))
            if was is not None and retyped is not None:  # dropped by a retype, then a crash
                retyped[schema.table] = (*retyped.get(schema.table, ()),
                                         RetypedColumn(column.name, was, column.type_sql))
        if fill:
            cursor.execute(fill_added_column(target, column))
        recording.append(column)
    if recording:  # last: a crash before leaves the columns to be finished by the next call
        names = [column.name for column in recording]
        cursor.execute(record.forget(len(names)), [table.name, *names])
        put_rows(cursor, record.table,
                 [(table.name, column.name, column.type_sql) for column in recording])


class SnowflakeWriter(WarehouseWriter):
    """Applies batches to one Snowflake destination, creating and widening its tables."""

    kind: ClassVar[str] = "Snowflake"
    ddl_in_transaction: ClassVar[bool] = False
    database_error: ClassVar[type[Exception]] = snowflake.connector.Error
    text_parameter: ClassVar[str] = TEXT_PARAMETER
    # The schemas read for the tables being prepared (none outside ``prepare``).
    _catalogs: dict[str, SchemaCatalog] = {}  # replaced by prepare, never mutated

    def kept(self, column: Column) -> KeptType:
        return snow_type(column)

    def refusal(self, schema: TableSchema) -> str | None:
        if schema.keyless and not self.values.text_as_sent:
            return (f"{schema.table.qualified} has no key, and destination {self.name} is "
                    "Snowflake, which compares the rows of such a table by their PostgreSQL "
                    "text: it takes them from the pgoutput engine only")
        return None

    def _names(self, table: TableRef, what: str) -> str:
        return quote(table.schema, f"_rosetta_{what}_{table.name}")

    def prepare(self, schemas: Iterable[TableSchema]) -> None:
        """Every table's plan, the destination schemas read once for all (not per table)."""
        schemas = list(schemas)
        for schema in schemas:
            self._refuse(schema)
        if not schemas:
            return
        names = {schema.target(self.name, self.target_schema).schema for schema in schemas}
        with self.database.connection() as conn:
            self._catalogs = {name: read_schema_catalog(conn, name) for name in sorted(names)}
            conn.execute(chunks_statements(self.target_schema)[1])
        try:
            super().prepare(schemas)
        finally:
            self._catalogs = {}

    def _plan(self, conn: SnowflakeCursor, schema: TableSchema) -> TablePlan:
        table = schema.target(self.name, self.target_schema)
        target = quote(table.schema, table.name)
        catalog = self._catalogs.get(table.schema)
        ensure_table(conn, schema, table, self.created, self.retyped, catalog)
        stage, raw = self._names(table, "stage"), self._names(table, "raw")
        converters = [(c.name, self.values.converter_for(c)) for c in schema.columns]
        if catalog is None:  # else made with the catalog read
            conn.execute(chunks_statements(self.target_schema)[1])
        if schema.keyless:
            keyless = keyless_statements(schema, target, stage, raw,
                                         quote(table.schema, NUMBERS_TABLE))
            for statement in keyless.create:
                conn.execute(statement)
            return TablePlan(schema, target, stage, batch_statements(schema, target, stage, raw),
                             converters, raw_rows=raw, keyless=keyless)
        for statement in stage_tables(schema, stage, raw, self._names(table, "excluded"),
                                      self._names(table, "excluded_raw")).create:
            conn.execute(statement)
        return TablePlan(schema, target, stage, batch_statements(schema, target, stage, raw),
                         converters, raw_rows=raw,
                         resync=resync_statements(schema, target, stage,
                                                  self._names(table, "resync")))

    def _apply_counts(self, conn: SnowflakeCursor, plan: TablePlan, changes: KeylessChanges,
                      result: BatchResult) -> None:
        """A table without a key: the rows of negative count removed (all equal rows, then the
        ones that stay inserted again), copies of the others inserted."""
        statements: KeylessStatements = plan.keyless
        frame = keyless_frame(changes)
        self._put_rows(conn, frame, plan.raw_rows, statements.fill_stage)
        if changes.removes_rows:
            conn.execute(statements.count_existing)
        row = conn.execute(statements.most_copies).fetchone()
        wanted, have = (int(row[0]), int(row[1])) if row else (0, 0)
        if wanted > have:  # the numbers 1..wanted, for the copies
            put_rows(conn, statements.numbers, [(n,) for n in range(have + 1, wanted + 1)])
        if changes.removes_rows:
            conn.execute(statements.delete)
        conn.execute(statements.insert)
        conn.execute(statements.clear_stage)
        result.rows_written += sum(abs(count) for count in changes.counts.values())

    def _put_rows(self, conn: SnowflakeCursor, frame: pandas.DataFrame, raw: str,
                  fill: str) -> None:
        conn.execute(f"DELETE FROM {raw}")
        put_rows(conn, raw, frame_rows(frame))
        conn.execute(fill)

    def _position_update(self, conn: SnowflakeCursor) -> str:
        table, _ = positions_statements(self.target_schema)
        return (f"UPDATE {table} SET position = ?, updated_at = CURRENT_TIMESTAMP() "
                "WHERE pipeline = ?")

    def _read_position(self, conn: SnowflakeCursor) -> int | None:
        return read_position(conn, self.target_schema, self.pipeline)

    def _table_names(self, conn: SnowflakeCursor, prefix: str) -> set[str]:
        rows = conn.execute("SELECT table_name FROM information_schema.tables WHERE "
                            f"{IN_SCHEMA} AND STARTSWITH(table_name, ?)",
                            [*in_schema(self.target_schema), prefix]).fetchall()
        return {row[0] for row in rows}

    # -- backfill chunks: tables the job staged (see ``staging``) ---------------------------

    def _chunks_table(self, conn: SnowflakeCursor) -> str:
        return chunks_statements(self.target_schema)[0]  # made with the tables

    def _chunk_staged(self, table: TableRef, job_id: int, chunk: int) -> bool:
        target = self._plans[table].schema.target(self.name, self.target_schema)
        name = f"_rosetta_chunk_{int(job_id)}_{int(chunk)}"
        with self.database.connection() as conn:
            row = conn.execute("SELECT count(*) FROM information_schema.tables WHERE "
                               f"{IN_SCHEMA} AND table_name = ?",
                               [*in_schema(target.schema), name]).fetchone()
        return bool(row and row[0])

    def _chunk_statements(self, plan: TablePlan, job_id: int, chunk: int, *, after: bool,
                          through: bool) -> ChunkMergeStatements:
        table = plan.schema.target(self.name, self.target_schema)
        return chunk_merge_statements(plan.schema, plan.target, chunk_table(table, job_id, chunk),
                                      self._names(table, "excluded"),
                                      self._names(table, "excluded_raw"),
                                      after=after, through=through)

    def _fill_chunk(self, conn: SnowflakeCursor, statements: ChunkMergeStatements,
                    job_id: int, chunk: int) -> None:
        return None  # the job staged it as a table

    def _excluded_raw(self, plan: TablePlan) -> str:
        return self._names(plan.schema.target(self.name, self.target_schema), "excluded_raw")

    def _bound_parameters(self, bounds: KeyBounds) -> list[Any]:
        return bound_parameters(*bounds)

    def _chunk_merged(self, table: TableRef, job_id: int, chunk: int) -> None:
        target = self._plans[table].schema.target(self.name, self.target_schema)
        with self.database.connection() as conn:
            conn.execute(f"DROP TABLE IF EXISTS {chunk_table(target, job_id, chunk)}")


def read_position(conn: SnowflakeCursor, target_schema: str, pipeline: str) -> int | None:
    exists = conn.execute("SELECT count(*) FROM information_schema.tables WHERE "
                          f"{IN_SCHEMA} AND table_name = '_rosetta_positions'",
                          in_schema(target_schema)).fetchone()
    if not exists or not exists[0]:
        return None
    table, _ = positions_statements(target_schema)
    row = conn.execute(f"SELECT position FROM {table} WHERE pipeline = ?", [pipeline]).fetchone()
    return None if row is None else int(row[0])
