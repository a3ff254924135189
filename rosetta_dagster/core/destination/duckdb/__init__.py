"""A DuckDB destination (``type: duckdb``, ``path:`` a database file).

* ``types`` - each PostgreSQL family's DuckDB type (native where exact, else its text);
* ``statements`` - every statement, as pure functions of a table (golden-text tests);
* ``database`` - the one writing process per file: the stream owns it, readers ask;
* ``writer`` - the stream's writer: batches merged per table, position in the same
  transaction;
* ``load`` - whole tables from the source's COPY (CSV) for the initial load;
* ``reader`` - counts and row checksums for the parity checks;
* ``staging`` - backfill chunks staged by the job as files, merged by the stream.

Not yet: backfills of a table without a key or with a row filter, re-snapshots through the
engine.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rosetta_dagster.core.destination.duckdb.database import (
    OwnedDatabase,
    catalog,
    connect,
    read_access,
)
from rosetta_dagster.core.destination.duckdb.load import DuckDBTableLoad
from rosetta_dagster.core.destination.duckdb.reader import DuckDBTableReader
from rosetta_dagster.core.destination.duckdb.staging import DuckDBChunkStaging, drop_job_staging
from rosetta_dagster.core.destination.duckdb.statements import positions_statements, quote
from rosetta_dagster.core.destination.duckdb.writer import DuckDBWriter, read_position

if TYPE_CHECKING:
    from rosetta_dagster.core.destination import SchemaSource
    from rosetta_dagster.core.pipeline_config import Destination, PipelineDefinition
    from rosetta_dagster.core.position_tracking import PositionTracking
    from rosetta_dagster.core.source_rows import SourceRows
    from rosetta_dagster.core.table_schema import TableSchema
    from rosetta_dagster.core.values import ValueCodec


class DuckDBPositionRow:
    """The pipeline's row in ``<schema>._rosetta_positions`` of the database file."""

    def __init__(self, pipeline: PipelineDefinition, destination: Destination) -> None:
        assert destination.path is not None
        self.path = destination.path
        self.schema = destination.schema
        self.pipeline = pipeline.name

    def read(self) -> tuple[int, dict[str, Any]] | None:
        """Through the hand-off: other processes read it too (the slot guard sensor)."""
        if not Path(self.path).exists():
            return None
        with read_access(self.path) as conn:
            position = read_position(conn, self.schema, self.pipeline)
            if position is None:
                return None
            table, _ = positions_statements(catalog(conn), self.schema)
            row = conn.execute(f"SELECT loads FROM {table} WHERE pipeline = ?",  # noqa: S608
                               [self.pipeline]).fetchone()
        return position, json.loads(row[0]) if row else {}

    def write_start(self, slot_name: str, lsn: int, loads: dict[str, Any]) -> None:
        with contextlib.closing(connect(self.path, what="its positions")) as conn:
            table, create = positions_statements(catalog(conn), self.schema)
            conn.execute(f"CREATE SCHEMA IF NOT EXISTS {quote(catalog(conn), self.schema)}")
            conn.execute(create)
            conn.execute(f"INSERT INTO {table} (pipeline, slot_name, position, loads) "  # noqa: S608
                         "VALUES (?, ?, ?, ?) ON CONFLICT (pipeline) DO UPDATE SET "
                         "slot_name = excluded.slot_name, position = excluded.position, "
                         "loads = excluded.loads, updated_at = now()",
                         [self.pipeline, slot_name, lsn, json.dumps(loads)])

    def write_loads(self, loads: dict[str, Any]) -> None:
        with contextlib.closing(connect(self.path, what="its positions")) as conn:
            table, _ = positions_statements(catalog(conn), self.schema)
            conn.execute(f"UPDATE {table} SET loads = ? WHERE pipeline = ?",  # noqa: S608
                         [json.dumps(loads), self.pipeline])

    def delete(self) -> bool:
        with contextlib.closing(connect(self.path, what="its positions")) as conn:
            table, _ = positions_statements(catalog(conn), self.schema)
            if read_position(conn, self.schema, self.pipeline) is None:
                return False
            conn.execute(f"DELETE FROM {table} WHERE pipeline = ?", [self.pipeline])  # noqa: S608
            return True


class DuckDBDestinations:
    """The DuckDB kind of destination."""

    def open_writer(self, pipeline: PipelineDefinition, destination: Destination, *,
                    values: ValueCodec, tracking: PositionTracking | None,
                    read_schema: SchemaSource, source_rows: SourceRows | None,
                    application_name: str) -> DuckDBWriter:
        assert destination.path is not None
        return DuckDBWriter(OwnedDatabase(destination.path), destination.schema, read_schema,
                            values=values, name=destination.name, pipeline=pipeline.name,
                            tracking=tracking, source_rows=source_rows)

    def open_staging(self, pipeline: PipelineDefinition, destination: Destination,
                     schema: TableSchema, job_id: int, *, filtered: bool = False
                     ) -> DuckDBChunkStaging:
        return DuckDBChunkStaging(pipeline, destination, schema, job_id, filtered=filtered)

    def drop_staging(self, pipeline: PipelineDefinition, destination: Destination,
                     job_ids: Collection[int]) -> None:
        drop_job_staging(destination, job_ids)

    def open_table_load(self, pipeline: PipelineDefinition, destination: Destination,
                        schema: TableSchema, *, widen: bool) -> DuckDBTableLoad:
        return DuckDBTableLoad(pipeline, destination, schema, widen=widen)

    @contextlib.contextmanager
    def open_reader(self, pipeline: PipelineDefinition, destination: Destination
                    ) -> Iterator[DuckDBTableReader]:
        assert destination.path is not None
        yield DuckDBTableReader(destination.path)

    def position_row(self, pipeline: PipelineDefinition, destination: Destination
                     ) -> DuckDBPositionRow:
        return DuckDBPositionRow(pipeline, destination)


DUCKDB = DuckDBDestinations()
