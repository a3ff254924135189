"""A stream's writer to a DuckDB database file (``warehouse.writer`` says what every warehouse
writer does): the batch's text rows staged from a pandas DataFrame and merged by one ``MERGE``
per table. Statements: ``statements``.

A table without a key is applied by net count per row (``keyless_changes``, pgoutput only).
Backfill chunks (staged as files by the job, see ``staging``) are merged here.
"""

from __future__ import annotations

from typing import Any, ClassVar

import duckdb
import pandas

from rosetta_dagster.core.destination import BatchResult, KeyBounds, RetypedColumn
from rosetta_dagster.core.destination.duckdb.database import catalog
from rosetta_dagster.core.destination.duckdb.staging import chunk_file
from rosetta_dagster.core.destination.duckdb.statements import (
    BACKFILL_CHUNKS,
    ChunkMergeStatements,
    add_column,
    batch_statements,
    chunk_merge_statements,
    create_table,
    drop_default,
    keyless_statements,
    literal,
    positions_statements,
    quote,
    resync_statements,
    retype_column,
)
from rosetta_dagster.core.destination.duckdb.types import duck_type
from rosetta_dagster.core.destination.keyless_changes import KeylessChanges
from rosetta_dagster.core.destination.warehouse.types import KeptType
from rosetta_dagster.core.destination.warehouse.writer import (
    TablePlan,
    WarehouseWriter,
    keyless_frame,
)
from rosetta_dagster.core.pipeline_config import TableRef
from rosetta_dagster.core.table_schema import Column, TableSchema


class DuckDBWriter(WarehouseWriter):
    """Applies batches to one DuckDB destination, creating and widening its tables."""

    kind: ClassVar[str] = "DuckDB"
    ddl_in_transaction: ClassVar[bool] = True
    database_error: ClassVar[type[Exception]] = duckdb.Error

    def kept(self, column: Column) -> KeptType:
        return duck_type(column)

    def refusal(self, schema: TableSchema) -> str | None:
        if schema.keyless and not self.values.text_as_sent:
            return (f"{schema.table.qualified} has no key, and destination {self.name} is "
                    "DuckDB, which compares the rows of such a table by their PostgreSQL text: "
                    "it takes them from the pgoutput engine only")
        return None

    def _plan(self, conn: duckdb.DuckDBPyConnection, schema: TableSchema) -> TablePlan:
        table = schema.target(self.name, self.target_schema)
        target = quote(catalog(conn), table.schema, table.name)
        ensure_table(conn, schema, table, self.created, self.retyped)
        stage = quote(f"_rosetta_stage_{abs(hash((schema.table, schema.columns))) % 10**12}")
        keys = quote(catalog(conn), table.schema, f"_rosetta_resync_{table.name}")
        return TablePlan(schema, target, stage, batch_statements(schema, target, stage),
                         [(c.name, self.values.converter_for(c)) for c in schema.columns],
                         keyless=keyless_statements(schema, target, stage) if schema.keyless
                         else None,
                         resync=None if schema.keyless
                         else resync_statements(schema, target, stage, keys))

    def _put_rows(self, conn: duckdb.DuckDBPyConnection, frame: pandas.DataFrame, raw: str,
                  fill: str) -> None:
        conn.register(raw, frame)
        try:
            conn.execute(fill)
        finally:
            conn.unregister(raw)

    def _position_update(self, conn: duckdb.DuckDBPyConnection) -> str:
        table, _ = positions_statements(catalog(conn), self.target_schema)
        return f"UPDATE {table} SET position = ?, updated_at = now() WHERE pipeline = ?"  # noqa: S608

    def _read_position(self, conn: duckdb.DuckDBPyConnection) -> int | None:
        return read_position(conn, self.target_schema, self.pipeline)

    def _table_names(self, conn: duckdb.DuckDBPyConnection, prefix: str) -> set[str]:
        return {row[0] for row in conn.execute(
            "SELECT table_name FROM duckdb_tables() WHERE schema_name = ? AND "
            "starts_with(table_name, ?)", [self.target_schema, prefix]).fetchall()}

    def _apply_counts(self, conn: duckdb.DuckDBPyConnection, plan: TablePlan,
                      changes: KeylessChanges, result: BatchResult) -> None:
        """A table without a key: remove that many equal rows, add that many copies."""
        statements = plan.keyless
        assert statements is not None
        conn.execute(statements.create_stage)
        self._put_rows(conn, keyless_frame(changes), "batch", statements.fill_stage)
        if changes.removes_rows:
            conn.execute(statements.delete)
        conn.execute(statements.insert)
        conn.execute(statements.clear_stage)
        result.rows_written += sum(abs(count) for count in changes.counts.values())

    # -- backfill chunks: files beside the database (see ``staging``) -----------------------

    def _chunks_table(self, conn: duckdb.DuckDBPyConnection) -> str:
        name = catalog(conn)
        table = quote(name, self.target_schema, BACKFILL_CHUNKS)
        conn.execute(f"CREATE SCHEMA IF NOT EXISTS {quote(name, self.target_schema)}")
        conn.execute(f"CREATE TABLE IF NOT EXISTS {table} (job BIGINT NOT NULL, "
                     "chunk INTEGER NOT NULL)")
        return table

    def _chunk_staged(self, table: TableRef, job_id: int, chunk: int) -> bool:
        return chunk_file(self.database.path, job_id, chunk).exists()  # type: ignore[attr-defined]

    def _chunk_statements(self, plan: TablePlan, job_id: int, chunk: int, *, after: bool,
                          through: bool) -> ChunkMergeStatements:
        return chunk_merge_statements(plan.schema, plan.target, quote("_rosetta_chunk"),
                                      quote("_rosetta_excluded"), after=after, through=through)

    def _fill_chunk(self, conn: duckdb.DuckDBPyConnection, statements: ChunkMergeStatements,
                    job_id: int, chunk: int) -> None:
        assert statements.fill_chunk is not None
        conn.execute(statements.fill_chunk,
                     [str(chunk_file(self.database.path, job_id, chunk))])  # type: ignore[attr-defined]

    def _bound_parameters(self, bounds: KeyBounds) -> list[Any]:
        after, through = bounds
        return [*(after or ()), *(through or ())]  # numbered: each once

    def _chunk_merged(self, table: TableRef, job_id: int, chunk: int) -> None:
        chunk_file(self.database.path, job_id, chunk).unlink(missing_ok=True)  # type: ignore[attr-defined]


def ensure_table(conn: duckdb.DuckDBPyConnection, schema: TableSchema, table: TableRef,
                 created: set[TableRef],
                 retyped: dict[TableRef, tuple[RetypedColumn, ...]] | None = None) -> None:
    """Create the destination table like the source, add new columns, and follow a column
    whose type changed on the source (each column's comment holds its source type): its
    DuckDB type changes where the new family is kept otherwise (a best-effort cast: NULL
    where it fails), and it is reported in ``retyped``, whose rows the caller copies again
    (the source rewrote them without a change event)."""
    name = catalog(conn)
    target = quote(name, table.schema, table.name)
    conn.execute(f"CREATE SCHEMA IF NOT EXISTS {quote(name, table.schema)}")
    existing = {name: comment for name, comment in conn.execute(
        "SELECT column_name, comment FROM duckdb_columns() "
        "WHERE schema_name = ? AND table_name = ?", [table.schema, table.name]).fetchall()}
    if not existing:
        conn.execute(create_table(schema, target))
        created.add(schema.table)
    for column in schema.columns:
        if existing and column.name not in existing:
            conn.execute(add_column(target, column))
            if column.missing_value is not None:
                conn.execute(drop_default(target, column))
        elif existing and existing[column.name] not in (None, column.type_sql):
            conn.execute(retype_column(target, column))
            if retyped is not None:
                retyped[schema.table] = (*retyped.get(schema.table, ()), RetypedColumn(
                    column.name, existing[column.name], column.type_sql))
        if not existing or existing.get(column.name) != column.type_sql:
            conn.execute(f"COMMENT ON COLUMN {target}.{quote(column.name)} IS "
                         f"{literal(column.type_sql)}")


def read_position(conn: duckdb.DuckDBPyConnection, target_schema: str,
                  pipeline: str) -> int | None:
    table, _ = positions_statements(catalog(conn), target_schema)
    exists = conn.execute("SELECT count(*) FROM duckdb_tables() WHERE schema_name = ? AND "
                          "table_name = '_rosetta_positions'", [target_schema]).fetchone()
    if not exists or not exists[0]:
        return None
    row = conn.execute(f"SELECT position FROM {table} WHERE pipeline = ?",  # noqa: S608
                       [pipeline]).fetchone()
    return None if row is None else int(row[0])
