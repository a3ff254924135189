"""A Snowflake destination (``type: snowflake``: the account, user, database and a password or
key pair; see ``connection``).

* ``types`` - each PostgreSQL family's Snowflake type (native where exact, else its text);
* ``statements`` - every statement, as pure functions of a table (golden-text tests);
* ``connection`` - the session's settings, authentication, errors without secrets;
* ``writer`` - the stream's writer: batches merged per table, position in the same
  transaction, every table made before it begins;
* ``load`` - whole tables from the source's COPY, through a stage and ``COPY INTO``;
* ``reader`` - counts and row checksums for the parity checks;
* ``staging`` - backfill chunks staged by the job as tables, merged by the stream.

Tested end to end against ``fakesnow``, an emulator of Snowflake on DuckDB (not Snowflake
itself), and by one live test when ``SNOWFLAKE_*`` variables name an account. Not yet:
backfills with a row filter or of a table without a key; a table without a key from Debezium.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Collection, Iterator
from typing import TYPE_CHECKING, Any

from rosetta_dagster.core.destination.snowflake.connection import SnowflakeSession, cursor
from rosetta_dagster.core.destination.snowflake.load import SnowflakeTableLoad
from rosetta_dagster.core.destination.snowflake.reader import SnowflakeTableReader
from rosetta_dagster.core.destination.snowflake.staging import (
    SnowflakeChunkStaging,
    drop_job_staging,
)
from rosetta_dagster.core.destination.snowflake.statements import positions_statements, quote
from rosetta_dagster.core.destination.snowflake.writer import SnowflakeWriter, read_position

if TYPE_CHECKING:
    from rosetta_dagster.core.destination import SchemaSource
    from rosetta_dagster.core.pipeline_config import Destination, PipelineDefinition
    from rosetta_dagster.core.position_tracking import PositionTracking
    from rosetta_dagster.core.source_rows import SourceRows
    from rosetta_dagster.core.table_schema import TableSchema
    from rosetta_dagster.core.values import ValueCodec


class SnowflakePositionRow:
    """The pipeline's row in ``<schema>._rosetta_positions``."""

    def __init__(self, pipeline: PipelineDefinition, destination: Destination) -> None:
        self.destination = destination
        self.schema = destination.schema
        self.pipeline = pipeline.name

    def read(self) -> tuple[int, dict[str, Any]] | None:
        with cursor(self.destination) as cur:
            position = read_position(cur, self.schema, self.pipeline)
            if position is None:
                return None
            table, _ = positions_statements(self.schema)
            row = cur.execute(f"SELECT loads FROM {table} WHERE pipeline = ?",
                              [self.pipeline]).fetchone()
        return position, json.loads(row[0]) if row else {}

    def write_start(self, slot_name: str, lsn: int, loads: dict[str, Any]) -> None:
        table, create = positions_statements(self.schema)
        with cursor(self.destination) as cur:
            cur.execute(f"CREATE SCHEMA IF NOT EXISTS {quote(self.schema)}")
            cur.execute(create)
            cur.execute("BEGIN TRANSACTION")
            cur.execute(f"DELETE FROM {table} WHERE pipeline = ?", [self.pipeline])
            cur.execute(f"INSERT INTO {table} (pipeline, slot_name, position, loads, updated_at) "
                        "VALUES (?, ?, ?, ?, CURRENT_TIMESTAMP())",
                        [self.pipeline, slot_name, lsn, json.dumps(loads)])
            cur.execute("COMMIT")

    def write_loads(self, loads: dict[str, Any]) -> None:
        table, _ = positions_statements(self.schema)
        with cursor(self.destination) as cur:
            cur.execute(f"UPDATE {table} SET loads = ? WHERE pipeline = ?",
                        [json.dumps(loads), self.pipeline])

    def delete(self) -> bool:
        table, _ = positions_statements(self.schema)
        with cursor(self.destination) as cur:
            if read_position(cur, self.schema, self.pipeline) is None:
                return False
            cur.execute(f"DELETE FROM {table} WHERE pipeline = ?", [self.pipeline])
            return True


class SnowflakeDestinations:
    """The Snowflake kind of destination."""

    def open_writer(self, pipeline: PipelineDefinition, destination: Destination, *,
                    values: ValueCodec, tracking: PositionTracking | None,
                    read_schema: SchemaSource, source_rows: SourceRows | None,
                    application_name: str) -> SnowflakeWriter:
        return SnowflakeWriter(SnowflakeSession(destination), destination.schema, read_schema,
                               values=values, name=destination.name, pipeline=pipeline.name,
                               tracking=tracking, source_rows=source_rows)

    def open_staging(self, pipeline: PipelineDefinition, destination: Destination,
                     schema: TableSchema, job_id: int, *, filtered: bool = False
                     ) -> SnowflakeChunkStaging:
        return SnowflakeChunkStaging(pipeline, destination, schema, job_id, filtered=filtered)

    def drop_staging(self, pipeline: PipelineDefinition, destination: Destination,
                     job_ids: Collection[int]) -> None:
        drop_job_staging(destination, job_ids)

    def open_table_load(self, pipeline: PipelineDefinition, destination: Destination,
                        schema: TableSchema, *, widen: bool) -> SnowflakeTableLoad:
        return SnowflakeTableLoad(pipeline, destination, schema, widen=widen)

    @contextlib.contextmanager
    def open_reader(self, pipeline: PipelineDefinition, destination: Destination
                    ) -> Iterator[SnowflakeTableReader]:
        with cursor(destination) as cur:
            yield SnowflakeTableReader(cur)

    def position_row(self, pipeline: PipelineDefinition, destination: Destination
                     ) -> SnowflakePositionRow:
        return SnowflakePositionRow(pipeline, destination)


SNOWFLAKE = SnowflakeDestinations()
